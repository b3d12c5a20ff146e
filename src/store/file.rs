//! The embedded store (`--data-dir`): the default [`Store`] of a single core. It owns one data
//! directory and everything in it; the rules of what a change is come from [`StateMachine`],
//! this module only makes its history durable and recovers it.
//!
//! On-disk layout:
//!
//! ```text
//! <dir>/LOCK                 held with an exclusive file lock while a process has the store open
//! <dir>/epoch                the epoch id (one line), written once when the directory is new
//! <dir>/log                  append-only change log: one record per group commit
//! <dir>/snapshot             optional: the whole state at some head, written by compaction
//! <dir>/consumers.jsonl      the consumer registry: one JSON record per line, the last line of
//!                            an id wins; changed records appended (at most about once a
//!                            second), rewritten whole only when compacted
//! <dir>/hook-claims          signed hook requests claimed inside their window (`<key> <expiry>`
//!                            lines, fsynced per claim, rewritten with the live ones at open)
//! <dir>/bundles/<checksum>   worker code, content-addressed by its lowercase hex SHA-256
//! ```
//!
//! A record (in `log`, and `snapshot` is one record) is `len: u32 LE | crc32(payload): u32 LE |
//! payload`. A log record's payload is either JSON, the changes of one group commit
//! (contiguous revisions), or a carried bundle: `bundle <checksum>\n` and the code. Every file
//! other than `log` is written as temp file + fsync + rename + fsync of the directory, so it is
//! either the old or the new version after a crash.
//!
//! Carried bundles: code up to [`CARRIED_MAX`] bytes is held in memory until the first change
//! that names it commits, and goes into the log in the same write, so a publish waits for one
//! fsync of one file. Creating the bundle's file in that transaction would cost about as much
//! again (its directory entry has to be journaled), so a background flusher writes it right
//! after (temp file, fsync, rename, fsync of the directory); until then reads are served from
//! memory. Open rewrites any carried bundle whose file the crash kept from being written, and
//! compaction, which drops the records carrying them, first flushes what is left. A bundle file
//! only ever appears whole and synced; one whose content does not match its name is damage.
//!
//! Durability: one writer task takes every pending [`Store::apply`], decides each in order,
//! appends one record, fsyncs once, and only then advances the durable watermark, sends the
//! head hint and answers. A torn last record (a crash mid-append) is cut off at open; a damaged
//! record with intact records after it is corruption and refuses to open. A cut tail may have
//! held changes that were acknowledged (a disk can lose or flip bytes of synced data, and the
//! damage looks the same), so after cutting one the store starts a new epoch over what
//! survived: consumers get RESET and a snapshot, and no revision is handed out twice in one
//! epoch. So does a snapshot whose epoch is not the directory's. If a write or fsync
//! fails, the store fences itself until restarted, as PostgreSQL does: after a failed fsync the
//! kernel's view of the file can no longer be trusted.
//!
//! The registry is not history: a damaged `consumers.jsonl` is logged, set aside (renamed to
//! `consumers.jsonl.damaged-<unix ms>`), and rebuilt from the records that still parse, and
//! the store opens. A `consumers.json` of an older version is read once and replaced.
//!
//! Depends on `store` and `core::types` only.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::claims::{ClaimsFile, unix_now};
use super::{
    Change, ChangeKind, ConsumerRecord, Outcome, Proposal, Recovered, StateMachine, Store,
    StoreError, Tail,
};
use crate::core::types::{Checksum, ConsumerId, Epoch, Revision, Version, WorkerName};

const LOCK_FILE: &str = "LOCK";
const EPOCH_FILE: &str = "epoch";
const LOG_FILE: &str = "log";
const SNAPSHOT_FILE: &str = "snapshot";
/// The registry of older versions, rewritten whole; read once and replaced by
/// [`REGISTRY_FILE`].
const LEGACY_CONSUMERS_FILE: &str = "consumers.json";
const REGISTRY_FILE: &str = "consumers.jsonl";
/// The registry file is compacted once it holds this much more than its live records.
const REGISTRY_COMPACT_SLACK: u64 = 1 << 20;
const BUNDLES_DIR: &str = "bundles";
/// Files being written end in this until renamed into place; leftovers are crash debris.
const TEMP_SUFFIX: &str = ".tmp";

/// Length and CRC in front of every record.
const RECORD_HEADER: usize = 8;
/// A log record holds at most [`MAX_BATCH`] changes of a few hundred bytes each; anything
/// longer is damage, which keeps the torn-tail scan from trusting a garbage length.
const MAX_LOG_RECORD: usize = 16 << 20;
/// Most proposals decided and synced together.
const MAX_BATCH: usize = 1024;
/// Version of the snapshot payload.
const SNAPSHOT_FORMAT: u32 = 1;
/// Bundles up to this size are carried by the log (see the module docs); larger ones are
/// fsynced on their own.
const CARRIED_MAX: usize = 64 << 10;
/// Most bundles held for a commit to carry (at most 16 MiB); past it, the held ones are
/// written to their files, so bundles of publishes that were refused cannot pile up.
const MAX_UNCARRIED: usize = 256;
/// Most carried bundles waiting for the flusher; past it, publishes write their bundles
/// themselves (with an fsync) until it catches up, so that memory stays bounded when bundles
/// arrive faster than files can be synced.
const MAX_UNFLUSHED: usize = 1024;
/// How a carried bundle's payload starts; a JSON batch starts with `[`.
const BUNDLE_TAG: &[u8] = b"bundle ";

/// Tunables of a [`FileStore`].
#[derive(Clone, Debug)]
pub struct FileStoreConfig {
    /// Changes kept in the retained log for resume.
    pub retain: usize,
    /// Compact (snapshot + fresh log) once the log holds more changes than this.
    pub compact_after: usize,
    /// The consumer registry is written at most this often.
    pub consumer_flush_interval: Duration,
}

impl FileStoreConfig {
    /// Defaults for retaining `retain` changes: compaction after `max(retain, 1000) * 4`
    /// logged changes, so a snapshot (which carries the retained tail) is a fraction of the
    /// log it replaces; the registry flushed at most once a second.
    pub fn new(retain: usize) -> Self {
        Self {
            retain,
            compact_after: retain.max(1000).saturating_mul(4),
            consumer_flush_interval: Duration::from_secs(1),
        }
    }
}

/// A [`Store`] in a local data directory; see the module docs for the layout and guarantees.
///
/// Dropping it stops its tasks and releases the directory lock shortly after; [`Self::close`]
/// does the same and waits for it.
pub struct FileStore {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
    closing: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What the store's handle, its writer and its registry flusher share.
struct Shared {
    dir: PathBuf,
    view: Mutex<View>,
    head: watch::Sender<Revision>,
    /// Why the store stopped accepting work; set once, never cleared.
    fence: OnceLock<String>,
    log_syncs: AtomicU64,
    registry: Mutex<Registry>,
    registry_changed: Notify,
    /// Small bundles on their way to disk (module docs).
    bundles: Mutex<PendingBundles>,
    /// Wakes the bundle flusher.
    bundles_carried: Notify,
    /// Claimed hook requests (`hook-claims`).
    claims: Mutex<ClaimsFile>,
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

/// The state machine and how much of it is durable. The writer commits a batch here before
/// its fsync (the next decision must see it); readers see only up to `durable`.
struct View {
    machine: StateMachine,
    durable: Revision,
}

struct Registry {
    records: BTreeMap<ConsumerId, ConsumerRecord>,
    /// Records changed since the last flush.
    dirty: HashSet<ConsumerId>,
}

/// The registry file's size, and its size right after the last compaction (about what the
/// live records take).
#[derive(Clone, Copy, Debug)]
struct RegistryFile {
    bytes: u64,
    compacted: u64,
}

impl RegistryFile {
    fn compaction_due(&self) -> bool {
        self.bytes > REGISTRY_COMPACT_SLACK.max(2 * self.compacted)
    }
}

enum Request {
    Apply {
        proposal: Proposal,
        timestamp_ms: i64,
        reply: oneshot::Sender<Result<Outcome, StoreError>>,
    },
    /// A load goes through the writer: between two batches the machine holds exactly the
    /// durable state, which a `Recovered` (unlike a log read) cannot be cut back to.
    Load {
        reply: oneshot::Sender<Result<Recovered, StoreError>>,
    },
}

impl Request {
    fn refuse(self, error: impl Fn() -> StoreError) {
        // A caller that went away does not need its answer.
        match self {
            Request::Apply { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Request::Load { reply } => {
                let _ = reply.send(Err(error()));
            }
        }
    }
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`, retaining the last `retain` changes.
    pub async fn open(dir: &Path, retain: usize) -> Result<Self, StoreError> {
        Self::open_with(dir, FileStoreConfig::new(retain)).await
    }

    /// Opens (creating if needed) the store in `dir` with explicit tunables. Fails with
    /// [`StoreError::Unavailable`] if another process (or store) has the directory open.
    pub async fn open_with(dir: &Path, config: FileStoreConfig) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let opened = {
            let dir = dir.clone();
            let config = config.clone();
            blocking(move || recover(&dir, &config)).await??
        };
        let head = opened.machine.head();
        let claims = {
            let dir = dir.clone();
            blocking(move || ClaimsFile::open(&dir, unix_now())).await??
        };
        tracing::info!(
            dir = %dir.display(), epoch = %opened.machine.epoch(), head,
            logged = opened.log.changes, "file store opened"
        );
        let shared = Arc::new(Shared {
            dir,
            view: Mutex::new(View {
                durable: head,
                machine: opened.machine,
            }),
            head: watch::Sender::new(head),
            fence: OnceLock::new(),
            log_syncs: AtomicU64::new(0),
            registry: Mutex::new(Registry {
                records: opened.consumers,
                dirty: HashSet::new(),
            }),
            registry_changed: Notify::new(),
            bundles: Mutex::new(PendingBundles::default()),
            bundles_carried: Notify::new(),
            claims: Mutex::new(claims),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        });
        // Both tasks hold the lock: the directory stays ours until neither can write to it.
        let lock = Arc::new(opened.lock);
        let closing = CancellationToken::new();
        let (requests, receiver) = mpsc::channel(MAX_BATCH);
        let writer = Writer {
            shared: shared.clone(),
            log: Some(opened.log),
            compact_after: config.compact_after.max(1),
            _lock: lock.clone(),
        };
        let tasks = vec![
            tokio::spawn(writer.run(receiver, closing.clone())),
            tokio::spawn(flush_bundles(shared.clone(), lock.clone(), closing.clone())),
            tokio::spawn(flush_registry(
                shared.clone(),
                lock,
                config.consumer_flush_interval,
                opened.registry_file,
                closing.clone(),
            )),
        ];
        Ok(Self {
            shared,
            requests,
            closing,
            tasks: Mutex::new(tasks),
        })
    }

    /// Stops the store: later calls fail, pending registry changes are written, and the
    /// directory lock is released when this returns.
    pub async fn close(&self) {
        self.closing.cancel();
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "file store task failed");
            }
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// How many times the change log has been fsynced since open: one per group commit.
    pub fn log_syncs(&self) -> u64 {
        self.shared.log_syncs.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<(), StoreError> {
        self.shared.check()?;
        if self.closing.is_cancelled() {
            return Err(closed());
        }
        Ok(())
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        self.check()?;
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    fn bundle_path(&self, checksum: &Checksum) -> Result<PathBuf, StoreError> {
        // Checksums deserialised from elsewhere skip validation; never let one name a path
        // outside `bundles/`.
        let text = checksum.as_str();
        if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(self.shared.dir.join(BUNDLES_DIR).join(text))
        } else {
            Err(StoreError::Corrupt(format!("not a checksum: {text:?}")))
        }
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        // The writer and the flusher finish on their own (the flusher writing what is
        // pending); `close` is the way to wait for that.
        self.closing.cancel();
    }
}

#[async_trait]
impl Store for FileStore {
    async fn load(&self) -> Result<Recovered, StoreError> {
        self.request(|reply| Request::Load { reply }).await
    }

    async fn put_bundle(&self, checksum: &Checksum, code: Bytes) -> Result<(), StoreError> {
        self.check()?;
        let path = self.bundle_path(checksum)?;
        if code.len() <= CARRIED_MAX {
            let shared = self.shared.clone();
            let checksum = checksum.clone();
            return blocking(move || shared.hold_bundle(&path, checksum, code)).await?;
        }
        blocking(move || write_bundle(&path, &code))
            .await?
            .map_err(|e| self.shared.bundle_error(e))
    }

    async fn bundle(&self, checksum: &Checksum) -> Result<Option<Bytes>, StoreError> {
        self.check()?;
        let held = {
            let pending = lock(&self.shared.bundles);
            (pending.unflushed.get(checksum))
                .or_else(|| pending.uncarried.get(checksum))
                .cloned()
        };
        if held.is_some() {
            return Ok(held);
        }
        let path = self.bundle_path(checksum)?;
        let checksum = checksum.clone();
        blocking(move || {
            let code = match fs::read(&path) {
                Ok(code) => code,
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(error.into()),
            };
            // Bit rot here would reach every edge; a content address makes it cheap to catch.
            if Checksum::of(&code) != checksum {
                return Err(StoreError::Corrupt(format!(
                    "bundle {} does not match its checksum",
                    path.display()
                )));
            }
            Ok(Some(Bytes::from(code)))
        })
        .await?
    }

    async fn apply(&self, proposal: Proposal, timestamp_ms: i64) -> Result<Outcome, StoreError> {
        self.request(|reply| Request::Apply {
            proposal,
            timestamp_ms,
            reply,
        })
        .await
    }

    async fn changes_after(&self, after: Revision, limit: usize) -> Result<Tail, StoreError> {
        self.check()?;
        let view = lock(&self.shared.view);
        Ok(view.machine.changes_after_until(after, limit, view.durable))
    }

    async fn head(&self) -> Result<(Epoch, Revision), StoreError> {
        self.check()?;
        let view = lock(&self.shared.view);
        Ok((view.machine.epoch().clone(), view.durable))
    }

    async fn claim_request(&self, key: &str, expires_unix_s: i64) -> Result<bool, StoreError> {
        self.check()?;
        let shared = self.shared.clone();
        let key = key.to_owned();
        blocking(move || {
            lock(&shared.claims)
                .claim(&key, expires_unix_s, unix_now())
                .map_err(StoreError::from)
        })
        .await?
    }

    fn head_hint(&self) -> watch::Receiver<Revision> {
        self.shared.head.subscribe()
    }

    async fn save_consumer(&self, record: &ConsumerRecord) -> Result<(), StoreError> {
        self.check()?;
        {
            let mut registry = lock(&self.shared.registry);
            registry
                .records
                .entry(record.id.clone())
                .and_modify(|existing| existing.absorb(record))
                .or_insert_with(|| record.clone());
            registry.dirty.insert(record.id.clone());
        }
        self.shared.registry_changed.notify_one();
        Ok(())
    }

    async fn remove_consumer(&self, id: &ConsumerId) -> Result<bool, StoreError> {
        self.check()?;
        let removed = {
            let mut registry = lock(&self.shared.registry);
            let removed = registry.records.remove(id).is_some();
            if removed {
                registry.dirty.insert(id.clone());
            }
            removed
        };
        if removed {
            self.shared.registry_changed.notify_one();
        }
        Ok(removed)
    }

    async fn consumers(&self) -> Result<Vec<ConsumerRecord>, StoreError> {
        self.check()?;
        Ok(lock(&self.shared.registry)
            .records
            .values()
            .cloned()
            .collect())
    }

    async fn close(&self) {
        FileStore::close(self).await;
    }
}

impl Shared {
    fn check(&self) -> Result<(), StoreError> {
        match self.fence.get() {
            Some(reason) => Err(fenced(reason)),
            None => Ok(()),
        }
    }

    /// Fences the store (the first reason sticks) and returns the error for the caller.
    fn fail(&self, reason: &str) -> StoreError {
        if self.fence.set(reason.to_owned()).is_ok() {
            tracing::error!(
                reason,
                "file store failed; refusing all work until restarted"
            );
            metrics::counter!("workerpush_store_failures_total").increment(1);
        }
        self.fenced_error()
    }

    fn fenced_error(&self) -> StoreError {
        fenced(self.fence.get().map_or("unknown failure", String::as_str))
    }

    /// Forgets carried bundles whose files are written.
    fn flushed(&self, written: &HashMap<Checksum, Bytes>) {
        let mut pending = lock(&self.bundles);
        for checksum in written.keys() {
            pending.unflushed.remove(checksum);
        }
    }

    /// A failed write fails the request; a failed sync fences the store.
    fn bundle_error(&self, error: BundleError) -> StoreError {
        match error {
            BundleError::Write(error) => error.into(),
            BundleError::Sync(error) => self.fail(&format!("syncing a bundle failed: {error}")),
        }
    }

    /// Holds a small bundle for the commit that names it to carry (module docs). A file that
    /// holds the code already is durable: bundle files only appear whole and synced.
    fn hold_bundle(&self, path: &Path, checksum: Checksum, code: Bytes) -> Result<(), StoreError> {
        let mut bundles = lock(&self.bundles);
        if bundles.uncarried.contains_key(&checksum) || bundles.unflushed.contains_key(&checksum) {
            return Ok(());
        }
        match fs::read(path) {
            Ok(held) if held == code => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            // Damaged after it was stored: rewrite it now, whoever carries it.
            _ => return write_bundle(path, &code).map_err(|e| self.bundle_error(e)),
        }
        if bundles.unflushed.len() >= MAX_UNFLUSHED {
            return write_bundle(path, &code).map_err(|e| self.bundle_error(e));
        }
        if bundles.uncarried.len() >= MAX_UNCARRIED {
            // Bundles of publishes that did not commit (or not yet): written out, they need no
            // carrying, whenever their commit comes.
            if let Err(error) = write_bundles(&self.dir.join(BUNDLES_DIR), &bundles.uncarried) {
                return Err(self.fail(&format!("writing bundles failed: {error}")));
            }
            bundles.uncarried.clear();
        }
        bundles.uncarried.insert(checksum, code);
        Ok(())
    }
}

fn fenced(reason: &str) -> StoreError {
    StoreError::Unavailable(format!("store failed: {reason}, restart required"))
}

fn closed() -> StoreError {
    StoreError::Unavailable("store closed".to_owned())
}

/// Small bundles between `put_bundle` and their synced file.
#[derive(Default)]
struct PendingBundles {
    /// Held for the commit that names them to carry.
    uncarried: HashMap<Checksum, Bytes>,
    /// Carried by a durable record, their files not written yet.
    unflushed: HashMap<Checksum, Bytes>,
}

/// The single writer of the log: group commit and compaction.
struct Writer {
    shared: Arc<Shared>,
    /// `None` only after a failure took it; the store is fenced by then.
    log: Option<Log>,
    compact_after: usize,
    _lock: Arc<File>,
}

struct Log {
    file: File,
    /// Changes in the current log file (stale ones included), for the compaction trigger.
    changes: usize,
}

impl Writer {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>, closing: CancellationToken) {
        loop {
            let first = tokio::select! {
                biased;
                () = closing.cancelled() => break,
                request = requests.recv() => match request {
                    Some(request) => request,
                    None => break,
                },
            };
            // Everything that queued up during the last fsync goes into this one.
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit(batch).await;
            self.compact_if_due().await;
        }
        requests.close();
        while let Ok(request) = requests.try_recv() {
            request.refuse(closed);
        }
    }

    async fn commit(&mut self, batch: Vec<Request>) {
        if let Some(reason) = self.shared.fence.get() {
            for request in batch {
                request.refuse(|| fenced(reason));
            }
            return;
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        let mut failure = None;
        {
            let mut view = lock(&self.shared.view);
            // Loads first: until this batch commits, the machine is exactly the durable state.
            let mut applies = Vec::with_capacity(batch.len());
            for request in batch {
                match request {
                    Request::Load { reply } => {
                        let _ = reply.send(Ok(view.machine.recovered()));
                    }
                    Request::Apply {
                        proposal,
                        timestamp_ms,
                        reply,
                    } => applies.push((proposal, timestamp_ms, reply)),
                }
            }
            for (proposal, timestamp_ms, reply) in applies {
                // Committed to the machine at once so the next proposal is decided after it.
                let outcome = view.machine.decide(&proposal, timestamp_ms);
                if let Outcome::Committed(change) = &outcome {
                    match view.machine.commit(change.clone()) {
                        Ok(()) => changes.push(change.clone()),
                        Err(error) => {
                            failure.get_or_insert(format!("state machine refused: {error}"));
                        }
                    }
                }
                answers.push((reply, outcome));
            }
        }
        let written = match (failure, changes.last()) {
            (Some(reason), _) => Err(reason),
            (None, Some(last)) => {
                let last = last.revision;
                let bundles = self.bundles_to_carry(&changes);
                let appended = self.append(&bundles, &changes).await;
                if appended.is_ok() && !bundles.is_empty() {
                    let mut pending = lock(&self.shared.bundles);
                    for (checksum, code) in bundles {
                        pending.uncarried.remove(&checksum);
                        pending.unflushed.insert(checksum, code);
                    }
                    drop(pending);
                    self.shared.bundles_carried.notify_one();
                }
                appended.map(|()| Some(last))
            }
            (None, None) => Ok(None),
        };
        // Every answer waits for this batch's fsync, not only the commits: an `Unchanged` or
        // `NotFound` may rest on a change decided just before it in the same batch.
        match written {
            Ok(durable) => {
                if let Some(last) = durable {
                    lock(&self.shared.view).durable = last;
                    self.shared.head.send_replace(last);
                    metrics::histogram!("workerpush_store_group_commit_changes")
                        .record(changes.len() as f64);
                }
                for (reply, outcome) in answers {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(reason) => {
                // Nothing of this batch may be seen: the watermark stays put and the fence
                // keeps `load` from reading the machine, which is now ahead of the disk.
                self.shared.fail(&reason);
                for (reply, _) in answers {
                    let _ = reply.send(Err(self.shared.fenced_error()));
                }
            }
        }
    }

    /// The held bundles that `changes` name, each once.
    fn bundles_to_carry(&self, changes: &[Change]) -> Vec<(Checksum, Bytes)> {
        let pending = lock(&self.shared.bundles);
        let mut seen = HashSet::new();
        changes
            .iter()
            .filter(|change| change.kind == ChangeKind::Put)
            .filter_map(|change| {
                let code = pending.uncarried.get(&change.checksum)?;
                seen.insert(&change.checksum)
                    .then(|| (change.checksum.clone(), code.clone()))
            })
            .collect()
    }

    /// Appends a record per carried bundle and one holding `changes`, in one write, and
    /// fsyncs it. `Err` says why; the caller fences.
    async fn append(
        &mut self,
        bundles: &[(Checksum, Bytes)],
        changes: &[Change],
    ) -> Result<(), String> {
        let payload =
            serde_json::to_vec(changes).map_err(|e| format!("encoding changes failed: {e}"))?;
        let mut record = Vec::new();
        for (checksum, code) in bundles {
            let mut payload = Vec::with_capacity(BUNDLE_TAG.len() + 65 + code.len());
            payload.extend_from_slice(BUNDLE_TAG);
            payload.extend_from_slice(checksum.as_str().as_bytes());
            payload.push(b'\n');
            payload.extend_from_slice(code);
            record.extend(frame(&payload, MAX_LOG_RECORD)?);
        }
        record.extend(frame(&payload, MAX_LOG_RECORD)?);
        let mut log = self
            .log
            .take()
            .ok_or_else(|| "the change log was lost after an earlier failure".to_owned())?;
        #[cfg(test)]
        let inject = self.shared.fail_next_sync.swap(false, Ordering::Relaxed);
        #[cfg(not(test))]
        let inject = false;
        let started = Instant::now();
        let (log, result) = blocking(move || {
            let result = log.file.write_all(&record).and_then(|()| {
                if inject {
                    Err(io::Error::other("injected fsync failure"))
                } else {
                    log.file.sync_data()
                }
            });
            (log, result)
        })
        .await
        .map_err(|e| format!("change log writer: {e}"))?;
        result.map_err(|e| format!("writing the change log failed: {e}"))?;
        metrics::histogram!("workerpush_store_log_sync_seconds")
            .record(started.elapsed().as_secs_f64());
        self.shared.log_syncs.fetch_add(1, Ordering::Relaxed);
        self.log = Some(Log {
            changes: log.changes + changes.len(),
            file: log.file,
        });
        Ok(())
    }

    async fn compact_if_due(&mut self) {
        let due = self
            .log
            .as_ref()
            .is_some_and(|log| log.changes > self.compact_after);
        if !due || self.shared.fence.get().is_some() {
            return;
        }
        // Between batches the machine holds exactly the durable state.
        let snapshot = Snapshot::of(&lock(&self.shared.view).machine);
        let dir = self.shared.dir.clone();
        // The new log carries nothing: what the old one carried must be in its files first.
        let unflushed = lock(&self.shared.bundles).unflushed.clone();
        let started = Instant::now();
        let shared = self.shared.clone();
        match blocking(move || {
            write_bundles(&dir.join(BUNDLES_DIR), &unflushed)?;
            shared.flushed(&unflushed);
            compact(&dir, &snapshot)
        })
        .await
        {
            Ok(Ok(file)) => {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "change log compacted"
                );
                self.log = Some(Log { file, changes: 0 });
            }
            Ok(Err(error)) => {
                self.shared
                    .fail(&format!("compacting the change log failed: {error}"));
            }
            Err(error) => {
                self.shared.fail(&format!("compaction: {error}"));
            }
        }
    }
}

/// Writes the files of carried bundles after their commit (module docs), and what is left
/// when the store closes. A failure fences the store: the disk can no longer be trusted.
async fn flush_bundles(shared: Arc<Shared>, _lock: Arc<File>, closing: CancellationToken) {
    loop {
        tokio::select! {
            () = shared.bundles_carried.notified() => {}
            () = closing.cancelled() => {}
        }
        let unflushed = lock(&shared.bundles).unflushed.clone();
        if !unflushed.is_empty() && shared.fence.get().is_none() {
            let dir = shared.dir.join(BUNDLES_DIR);
            let written = {
                let shared = shared.clone();
                blocking(move || {
                    write_bundles(&dir, &unflushed)?;
                    shared.flushed(&unflushed);
                    io::Result::Ok(())
                })
                .await
            };
            match written {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    shared.fail(&format!("writing bundles failed: {error}"));
                }
                Err(error) => {
                    shared.fail(&format!("bundle flusher: {error}"));
                }
            }
        }
        if closing.is_cancelled() {
            return;
        }
    }
}

/// Writes the changed records of the registry, at most once per `interval`, and once more
/// when the store closes: appended to the registry file, which is rewritten whole only once
/// it holds much more than its live records.
async fn flush_registry(
    shared: Arc<Shared>,
    _lock: Arc<File>,
    interval: Duration,
    mut file: RegistryFile,
    closing: CancellationToken,
) {
    let mut last_flush: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shared.registry_changed.notified() => {}
            () = closing.cancelled() => {}
        }
        if let Some(last) = last_flush {
            tokio::select! {
                () = tokio::time::sleep_until((last + interval).into()) => {}
                () = closing.cancelled() => {}
            }
        }
        file = write_registry(&shared, file).await;
        last_flush = Some(Instant::now());
        if closing.is_cancelled() {
            return;
        }
    }
}

/// Appends the changed records (or compacts, when due); answers the file's new size.
async fn write_registry(shared: &Arc<Shared>, file: RegistryFile) -> RegistryFile {
    let (records, changed, compact): (Vec<ConsumerRecord>, Vec<ConsumerId>, bool) = {
        let mut registry = lock(&shared.registry);
        if registry.dirty.is_empty() {
            return file;
        }
        let changed: Vec<_> = registry.dirty.drain().collect();
        // A removed record has no line to append (the last line of an id wins): rewrite the
        // file without it. Removals are rare (deregistrations).
        let compact =
            file.compaction_due() || changed.iter().any(|id| !registry.records.contains_key(id));
        let records = if compact {
            registry.records.values().cloned().collect()
        } else {
            changed
                .iter()
                .filter_map(|id| registry.records.get(id).cloned())
                .collect()
        };
        (records, changed, compact)
    };
    let dir = shared.dir.clone();
    let written = blocking(move || {
        let lines = registry_lines(&records)?;
        let len = lines.len() as u64;
        if compact {
            write_atomically(&dir, REGISTRY_FILE, &lines)?;
            Ok::<_, io::Error>(RegistryFile {
                bytes: len,
                compacted: len,
            })
        } else {
            let mut out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(REGISTRY_FILE))?;
            out.write_all(&lines)?;
            out.sync_data()?;
            Ok(RegistryFile {
                bytes: file.bytes.saturating_add(len),
                ..file
            })
        }
    })
    .await;
    let error = match written {
        Ok(Ok(file)) => return file,
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    // A failed append may have left part of a line: the next compaction rewrites the file,
    // and a torn last line is skipped at open. Try again at the next flush.
    tracing::warn!(%error, "writing the consumer registry failed; will retry");
    lock(&shared.registry).dirty.extend(changed);
    shared.registry_changed.notify_one();
    // What the file holds is not known now: rewrite it whole next time.
    RegistryFile {
        bytes: u64::MAX,
        compacted: 0,
    }
}

/// One JSON line per record.
fn registry_lines(records: &[ConsumerRecord]) -> io::Result<Vec<u8>> {
    let mut lines = Vec::new();
    for record in records {
        serde_json::to_writer(&mut lines, record).map_err(io::Error::other)?;
        lines.push(b'\n');
    }
    Ok(lines)
}

/// The registry as the directory holds it. Damage costs the damaged records, never the open:
/// the damaged file is set aside and a clean one written from what parsed.
fn recover_registry(
    dir: &Path,
) -> Result<(BTreeMap<ConsumerId, ConsumerRecord>, RegistryFile), StoreError> {
    let path = dir.join(REGISTRY_FILE);
    let legacy = dir.join(LEGACY_CONSUMERS_FILE);
    let mut records = BTreeMap::new();
    let mut rewrite = false;
    match read_if_exists(&path)? {
        Some(bytes) => {
            let torn = !bytes.is_empty() && !bytes.ends_with(b"\n");
            let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
            let mut damaged = 0usize;
            for (index, line) in lines.iter().enumerate() {
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<ConsumerRecord>(line) {
                    Ok(record) => {
                        records.insert(record.id.clone(), record);
                    }
                    // A crash mid-append: the last line is incomplete.
                    Err(_) if torn && index + 1 == lines.len() => rewrite = true,
                    Err(_) => damaged += 1,
                }
            }
            if damaged > 0 {
                let aside = set_aside(&path)?;
                tracing::error!(
                    file = %path.display(), set_aside = %aside.display(), damaged,
                    kept = records.len(),
                    "consumer registry damaged; set aside and rebuilt from the records that parse"
                );
                rewrite = true;
            }
        }
        None => {
            if let Some(bytes) = read_if_exists(&legacy)? {
                match serde_json::from_slice::<Vec<ConsumerRecord>>(&bytes) {
                    Ok(old) => records.extend(old.into_iter().map(|r| (r.id.clone(), r))),
                    Err(error) => {
                        let aside = set_aside(&legacy)?;
                        tracing::error!(
                            %error, file = %legacy.display(), set_aside = %aside.display(),
                            "consumer registry damaged; set aside, starting an empty one"
                        );
                    }
                }
                rewrite = true;
            }
        }
    }
    let bytes = if rewrite {
        let records: Vec<_> = records.values().cloned().collect();
        let lines = registry_lines(&records)?;
        write_atomically(dir, REGISTRY_FILE, &lines)?;
        match fs::remove_file(&legacy) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error.into()),
            _ => {}
        }
        lines.len() as u64
    } else {
        fs::metadata(&path).map_or(0, |m| m.len())
    };
    Ok((
        records,
        RegistryFile {
            bytes,
            compacted: bytes,
        },
    ))
}

/// Renames a damaged file out of the way; answers its new name.
fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".damaged-{stamp}"));
    let aside = PathBuf::from(name);
    fs::rename(path, &aside)?;
    Ok(aside)
}

/// The whole state at one head: what compaction writes and recovery starts from.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    format: u32,
    epoch: Epoch,
    head: Revision,
    latest: Vec<Change>,
    /// Every (worker, version) ever published: immutability outlives deletes.
    versions: Vec<(WorkerName, Version, Checksum)>,
    tail: Vec<Change>,
}

impl Snapshot {
    fn of(machine: &StateMachine) -> Self {
        let recovered = machine.recovered();
        let mut versions: Vec<_> = machine
            .versions()
            .map(|(w, v, c)| (w.clone(), v.clone(), c.clone()))
            .collect();
        versions.sort();
        Self {
            format: SNAPSHOT_FORMAT,
            epoch: recovered.epoch,
            head: recovered.head,
            latest: recovered.latest,
            versions,
            tail: recovered.tail,
        }
    }

    fn into_machine(self, epoch: &Epoch, retain: usize) -> Result<StateMachine, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("snapshot: {what}"));
        if self.format != SNAPSHOT_FORMAT {
            return Err(corrupt(&format!("unknown format {}", self.format)));
        }
        if &self.epoch != epoch {
            return Err(corrupt(&format!(
                "epoch {} is not the directory's epoch {epoch}",
                self.epoch
            )));
        }
        let contiguous = self
            .tail
            .windows(2)
            .all(|pair| pair[1].revision == pair[0].revision + 1);
        let ends_at_head = self.tail.last().is_none_or(|c| c.revision == self.head);
        if !contiguous || !ends_at_head {
            return Err(corrupt("retained tail is not contiguous up to the head"));
        }
        if self.latest.iter().any(|c| c.revision > self.head) {
            return Err(corrupt("a latest version is past the head"));
        }
        Ok(StateMachine::restore(
            self.epoch,
            retain,
            self.head,
            self.latest,
            self.versions,
            self.tail,
        ))
    }
}

/// What recovery hands to a new [`FileStore`].
struct Opened {
    lock: File,
    machine: StateMachine,
    log: Log,
    consumers: BTreeMap<ConsumerId, ConsumerRecord>,
    registry_file: RegistryFile,
}

/// Opens the directory: lock, clean up crash debris, epoch, snapshot, log replay.
fn recover(dir: &Path, config: &FileStoreConfig) -> Result<Opened, StoreError> {
    fs::create_dir_all(dir.join(BUNDLES_DIR))?;
    let lock = lock_dir(dir)?;
    remove_temp_files(dir)?;
    remove_temp_files(&dir.join(BUNDLES_DIR))?;

    let log_bytes = read_if_exists(&dir.join(LOG_FILE))?;
    let log_len = log_bytes.as_ref().map_or(0, Vec::len);
    let parsed = parse_log(log_bytes.as_deref().unwrap_or_default())?;
    // Carried bundles whose files were not written before the crash come back from the log.
    let bundles_dir = dir.join(BUNDLES_DIR);
    for (checksum, code) in &parsed.bundles {
        let path = bundles_dir.join(checksum.as_str());
        if fs::read(&path).is_ok_and(|held| held == *code) {
            continue;
        }
        tracing::warn!(%checksum, "bundle restored from the change log");
        if let Err(BundleError::Write(error) | BundleError::Sync(error)) = write_bundle(&path, code)
        {
            return Err(error.into());
        }
    }
    let snapshot = match read_if_exists(&dir.join(SNAPSHOT_FILE))? {
        Some(bytes) => Some(decode_snapshot(&bytes)?),
        None => None,
    };

    // A new directory gets its (empty) log before its epoch, so an epoch without a log can
    // only mean the log was lost, and a log without an epoch holds nothing yet.
    let epoch = match read_if_exists(&dir.join(EPOCH_FILE))? {
        Some(_) if log_bytes.is_none() => {
            return Err(StoreError::Corrupt(format!(
                "{} has an epoch but no change log",
                dir.display()
            )));
        }
        Some(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            Epoch::parse(text.trim())
                .map_err(|e| StoreError::Corrupt(format!("epoch file: {e}")))?
        }
        // History without its epoch: making a new one would let consumers resume into a
        // different history under the revisions they hold.
        None if snapshot.is_some() || !parsed.batches.is_empty() => {
            return Err(StoreError::Corrupt(format!(
                "{} holds a change history but no epoch file",
                dir.display()
            )));
        }
        None => {
            if log_bytes.is_none() {
                File::create(dir.join(LOG_FILE))?.sync_all()?;
                sync_dir(dir)?;
            }
            let epoch = Epoch::generate();
            write_atomically(dir, EPOCH_FILE, format!("{epoch}\n").as_bytes())?;
            tracing::info!(%epoch, dir = %dir.display(), "new data directory, new epoch");
            epoch
        }
    };

    // Signs that acknowledged history may be gone: the epoch cannot go on (see the module
    // docs).
    let mut history_lost = Vec::new();
    let mut machine = match snapshot {
        Some(mut snapshot) => {
            if snapshot.epoch != epoch {
                history_lost.push("the snapshot's epoch is not the directory's");
                snapshot.epoch = epoch.clone();
            }
            snapshot.into_machine(&epoch, config.retain)?
        }
        None => StateMachine::new(epoch, config.retain),
    };
    let mut logged = 0;
    let mut stale = 0;
    for change in parsed.batches.into_iter().flatten() {
        logged += 1;
        // A log that a snapshot already covers: the crash came between writing the snapshot
        // and starting the fresh log.
        if change.revision <= machine.head() {
            stale += 1;
            continue;
        }
        machine.commit(change).map_err(|e| {
            StoreError::Corrupt(format!("log does not follow the snapshot or itself: {e}"))
        })?;
    }

    let log_path = dir.join(LOG_FILE);
    if parsed.valid_len < log_len {
        tracing::warn!(
            kept = parsed.valid_len,
            discarded = log_len - parsed.valid_len,
            "change log ends in a torn record (crash mid-write); cutting it off"
        );
        let file = OpenOptions::new().write(true).open(&log_path)?;
        file.set_len(parsed.valid_len as u64)?;
        file.sync_all()?;
        history_lost.push("the change log's tail was cut");
    }
    let new_epoch = !history_lost.is_empty();
    if new_epoch {
        // The epoch file first: a crash before the snapshot below leaves a snapshot of the
        // old epoch, which the next open takes as the same sign.
        let epoch = Epoch::generate();
        tracing::warn!(
            old_epoch = %machine.epoch(), %epoch, head = machine.head(),
            why = %history_lost.join("; "),
            "acknowledged history may be lost; starting a new epoch over what survived \
             (consumers get RESET and a snapshot)"
        );
        write_atomically(dir, EPOCH_FILE, format!("{epoch}\n").as_bytes())?;
        let snapshot = Snapshot {
            epoch: epoch.clone(),
            ..Snapshot::of(&machine)
        };
        machine = snapshot.into_machine(&epoch, config.retain)?;
    }
    let log = if new_epoch || stale > 0 || logged > config.compact_after {
        // Finish the compaction the crash interrupted (or one that is overdue).
        Log {
            file: compact(dir, &Snapshot::of(&machine))?,
            changes: 0,
        }
    } else {
        Log {
            file: OpenOptions::new().append(true).open(&log_path)?,
            changes: logged,
        }
    };

    let (consumers, registry_file) = recover_registry(dir)?;
    Ok(Opened {
        lock,
        machine,
        log,
        consumers,
        registry_file,
    })
}

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "data directory {} is in use by another process (lock {} is held)",
            dir.display(),
            path.display()
        ))),
        Err(fs::TryLockError::Error(error)) => Err(error.into()),
    }
}

/// Writes the snapshot of `state`, then replaces the log with an empty one; returns the new
/// log, open for appending.
///
/// Crash safety: the snapshot is durable (renamed, directory synced) before the log is
/// touched, so a crash leaves either the old snapshot with the whole log, or the new snapshot
/// with the old log (every record in it at or below the snapshot's head, skipped and then
/// compacted away at open), or the new snapshot with the empty log.
fn compact(dir: &Path, state: &Snapshot) -> io::Result<File> {
    let payload = serde_json::to_vec(state).map_err(io::Error::other)?;
    let record = frame(&payload, u32::MAX as usize).map_err(io::Error::other)?;
    write_atomically(dir, SNAPSHOT_FILE, &record)?;
    let temp = dir.join(format!("{LOG_FILE}{TEMP_SUFFIX}"));
    match fs::remove_file(&temp) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&temp)?;
    file.sync_all()?;
    fs::rename(&temp, dir.join(LOG_FILE))?;
    sync_dir(dir)?;
    Ok(file)
}

/// The log's intact records, and where they end.
struct ParsedLog {
    batches: Vec<Vec<Change>>,
    /// Carried bundles, by checksum.
    bundles: Vec<(Checksum, Vec<u8>)>,
    valid_len: usize,
}

/// One intact log record.
enum LogRecord {
    Changes(Vec<Change>),
    Bundle(Checksum, Vec<u8>),
}

/// Reads records until the first damaged one. Only the last group commit can be torn (each
/// is one record, fsynced before the next is written), so damage followed by any intact
/// record is corruption of durable history, not a torn tail.
fn parse_log(bytes: &[u8]) -> Result<ParsedLog, StoreError> {
    let mut batches = Vec::new();
    let mut bundles = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_record(bytes, at) {
            Some((LogRecord::Changes(changes), next)) => {
                batches.push(changes);
                at = next;
            }
            Some((LogRecord::Bundle(checksum, code), next)) => {
                bundles.push((checksum, code));
                at = next;
            }
            None => break,
        }
    }
    if let Some(intact) = (at + 1..bytes.len()).find(|&p| decode_record(bytes, p).is_some()) {
        return Err(StoreError::Corrupt(format!(
            "change log damaged at byte {at}, with intact records after it (at byte {intact})"
        )));
    }
    Ok(ParsedLog {
        batches,
        bundles,
        valid_len: at,
    })
}

fn decode_record(bytes: &[u8], at: usize) -> Option<(LogRecord, usize)> {
    let (payload, next) = unframe(bytes, at, MAX_LOG_RECORD)?;
    if let Some(rest) = payload.strip_prefix(BUNDLE_TAG) {
        let (name, code) = rest.split_at_checked(64)?;
        let code = code.strip_prefix(b"\n")?;
        let checksum = Checksum::parse(std::str::from_utf8(name).ok()?).ok()?;
        // The CRC vouches for the bytes; the checksum for what they are.
        return (Checksum::of(code) == checksum)
            .then(|| (LogRecord::Bundle(checksum, code.to_vec()), next));
    }
    let changes: Vec<Change> = serde_json::from_slice(payload).ok()?;
    (!changes.is_empty()).then_some((LogRecord::Changes(changes), next))
}

fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("snapshot: {what}"));
    match unframe(bytes, 0, u32::MAX as usize) {
        Some((payload, end)) if end == bytes.len() => {
            serde_json::from_slice(payload).map_err(|e| corrupt(&e.to_string()))
        }
        Some(_) => Err(corrupt("trailing bytes")),
        None => Err(corrupt("damaged record")),
    }
}

/// `len | crc | payload`.
fn frame(payload: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| len as usize <= max)
        .ok_or_else(|| format!("record of {} bytes is too large", payload.len()))?;
    let mut record = Vec::with_capacity(RECORD_HEADER + payload.len());
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    record.extend_from_slice(payload);
    Ok(record)
}

/// The payload of the record at `at` and where the next one starts; `None` if it is
/// incomplete or damaged. An empty payload is damage too: a zero-filled tail (an extended
/// file whose data never landed) would otherwise read as records with CRC 0.
fn unframe(bytes: &[u8], at: usize, max: usize) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at.checked_add(RECORD_HEADER)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > max {
        return None;
    }
    let start = at + RECORD_HEADER;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    (crc32fast::hash(payload) == crc).then_some((payload, start + len))
}

enum BundleError {
    /// Nothing was published; the request failed.
    Write(io::Error),
    /// Durability of the directory is in doubt.
    Sync(io::Error),
}

/// Writes a bundle durably: temp file, fsync, rename, fsync of the directory. A file that
/// already holds the code is kept.
fn write_bundle(path: &Path, code: &[u8]) -> Result<(), BundleError> {
    let dir = path
        .parent()
        .ok_or_else(|| BundleError::Write(io::Error::other("bundle path has no directory")))?;
    if place_bundle(path, code).map_err(BundleError::Write)? {
        sync_dir(dir).map_err(BundleError::Sync)?;
    }
    Ok(())
}

/// [`write_bundle`] for many bundles in `dir`, with one fsync of the directory.
fn write_bundles(dir: &Path, bundles: &HashMap<Checksum, Bytes>) -> io::Result<()> {
    let mut placed = false;
    for (checksum, code) in bundles {
        placed |= place_bundle(&dir.join(checksum.as_str()), code)?;
    }
    if placed { sync_dir(dir) } else { Ok(()) }
}

/// Temp file, fsync, rename into `path`, unless `path` holds `code` already. Returns whether
/// it renamed (the directory then needs an fsync).
fn place_bundle(path: &Path, code: &[u8]) -> io::Result<bool> {
    if fs::read(path).is_ok_and(|held| held == code) {
        return Ok(false);
    }
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("bundle path has no directory"))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // Two writers of the same code may race; each writes its own temp file.
    let temp = dir.join(format!(
        "{name}.{:016x}{TEMP_SUFFIX}",
        rand::random::<u64>()
    ));
    let written = File::create(&temp).and_then(|mut file| {
        file.write_all(code)?;
        file.sync_all()
    });
    written
        .and_then(|()| fs::rename(&temp, path))
        .inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })?;
    Ok(true)
}

/// Temp file, fsync, rename over `name`, fsync the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let temp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, dir.join(name))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_temp_files(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
            tracing::debug!(path = %entry.path().display(), "removing a temp file left by a crash");
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn read_if_exists(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// Runs blocking file work off the async worker threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoreError::Unavailable(format!("file store task failed: {e}")))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections are single commits, inserts or reads; a panic elsewhere cannot leave
    // the data half-changed, so a poisoned lock is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::store::conformance::{self, put};

    const TS: i64 = 1_700_000_000_000;

    async fn open(dir: &Path) -> FileStore {
        FileStore::open(dir, 1000).await.unwrap()
    }

    async fn open_compacting(dir: &Path, retain: usize, compact_after: usize) -> FileStore {
        let config = FileStoreConfig {
            retain,
            compact_after,
            consumer_flush_interval: Duration::from_secs(1),
        };
        FileStore::open_with(dir, config).await.unwrap()
    }

    async fn commit(store: &FileStore, proposal: Proposal) -> Change {
        match store.apply(proposal, TS).await.unwrap() {
            Outcome::Committed(change) => change,
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    fn delete(worker: &str) -> Proposal {
        Proposal::Delete {
            worker: WorkerName::parse(worker).unwrap(),
            deployer: "".into(),
        }
    }

    /// Commits `n` changes one at a time (one record each): puts of several workers, with a
    /// delete now and then, so the state has history, live workers and dead ones.
    async fn commit_history(store: &FileStore, n: usize) {
        for i in 0..n {
            if i % 7 == 6 {
                commit(store, delete(&format!("w{}", (i - 1) % 5))).await;
            } else {
                let code = format!("code-{i}");
                commit(
                    store,
                    put(&format!("w{}", i % 5), &i.to_string(), code.as_bytes()),
                )
                .await;
            }
        }
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join(LOG_FILE)
    }

    fn append_to_log(dir: &Path, bytes: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(log_path(dir)).unwrap();
        file.write_all(bytes).unwrap();
    }

    #[tokio::test]
    async fn file_store_passes_the_conformance_suite() {
        let dirs = Arc::new(Mutex::new(Vec::new()));
        conformance::run_all(|| {
            let dirs = dirs.clone();
            async move {
                let dir = tempfile::tempdir().unwrap();
                let store = open(dir.path()).await;
                lock(&dirs).push(dir);
                store
            }
        })
        .await;
    }

    // `survives_reopen` reopens synchronously; block_in_place needs the multi-thread runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let first = open(&path).await;
        conformance::survives_reopen(first, |first| {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    first.close().await;
                    open(&path).await
                })
            })
        })
        .await;
    }

    #[tokio::test]
    async fn a_second_open_of_a_locked_dir_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path()).await;
        let Err(error) = FileStore::open(dir.path(), 10).await else {
            panic!("a second store opened a locked directory");
        };
        assert!(
            matches!(&error, StoreError::Unavailable(m) if m.contains("in use by another process")),
            "{error}"
        );
        first.close().await;
        let again = FileStore::open(dir.path(), 10).await;
        assert!(again.is_ok(), "closing releases the lock");
    }

    #[tokio::test]
    async fn a_cut_tail_starts_a_new_epoch_over_everything_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        commit_history(&store, 5).await;
        let before = store.load().await.unwrap();
        store.close().await;

        // Half of a real record, as a crash mid-append (or a lost block) leaves it.
        let change = Change {
            revision: 6,
            ..before.tail[0].clone()
        };
        let record = frame(&serde_json::to_vec(&[change]).unwrap(), MAX_LOG_RECORD).unwrap();
        append_to_log(dir.path(), &record[..record.len() / 2]);

        let store = open(dir.path()).await;
        let after = store.load().await.unwrap();
        assert_ne!(after.epoch, before.epoch, "a cut tail starts a new epoch");
        assert_eq!(
            (after.head, &after.latest, &after.tail),
            (before.head, &before.latest, &before.tail)
        );
        assert_eq!(
            fs::metadata(log_path(dir.path())).unwrap().len(),
            0,
            "the cut log is compacted into a snapshot of the new epoch"
        );
        assert_eq!(commit(&store, put("x", "1", b"x")).await.revision, 6);
        store.close().await;

        // A clean reopen keeps the epoch.
        let store = open(dir.path()).await;
        assert_eq!(store.load().await.unwrap().epoch, after.epoch);
        store.close().await;

        // A file extended with zeros whose data never landed.
        append_to_log(dir.path(), &[0u8; 4096]);
        let store = open(dir.path()).await;
        let state = store.load().await.unwrap();
        assert_eq!(state.head, 6);
        assert_ne!(state.epoch, after.epoch);
        assert_eq!(state.tail[..5], before.tail[..]);
        store.close().await;
    }

    #[tokio::test]
    async fn a_snapshot_of_another_epoch_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_compacting(dir.path(), 4, 10).await;
        commit_history(&store, 25).await;
        let before = store.load().await.unwrap();
        store.close().await;
        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        // The epoch file of a crash between writing a new epoch and its snapshot.
        let written = Epoch::generate();
        write_atomically(dir.path(), EPOCH_FILE, format!("{written}\n").as_bytes()).unwrap();

        let store = open_compacting(dir.path(), 4, 10).await;
        let after = store.load().await.unwrap();
        assert!(after.epoch != before.epoch && after.epoch != written);
        assert_eq!((after.head, &after.latest), (before.head, &before.latest));
        store.close().await;
        let store = open_compacting(dir.path(), 4, 10).await;
        assert_eq!(
            store.load().await.unwrap().epoch,
            after.epoch,
            "and keeps it"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn the_registry_is_appended_to_and_compacted_once_it_outgrows_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = FileStoreConfig {
            consumer_flush_interval: Duration::from_millis(1),
            ..FileStoreConfig::new(10)
        };
        let store = FileStore::open_with(dir.path(), config.clone())
            .await
            .unwrap();
        let path = dir.path().join(REGISTRY_FILE);
        let record = |i: usize, seen: i64| ConsumerRecord {
            id: ConsumerId::authorize("edge", &format!("edge/h{i}")).unwrap(),
            endpoint: format!("10.0.0.1:{i}"),
            labels: BTreeMap::from([("zone".to_owned(), "a".repeat(100))]),
            transport: "grpc".to_owned(),
            first_seen_ms: 1,
            last_seen_ms: seen,
            last_acked_revision: 0,
        };
        let len = || fs::metadata(&path).map_or(0, |m| m.len());
        // The same thousand records saved again and again: each flush appends the changes.
        let mut largest = 0;
        for round in 0..20 {
            for i in 0..1000 {
                store.save_consumer(&record(i, round)).await.unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !lock(&store.shared.registry).dirty.is_empty() {
                assert!(Instant::now() < deadline, "registry not flushed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            largest = largest.max(len());
        }
        // A round is about 230 KB: twenty of them, never compacted, would be 4.6 MB.
        let one_round = 1000 * 200;
        assert!(
            largest > 2 * one_round,
            "appended, not rewritten: {largest}"
        );
        assert!(largest < 1_700_000, "compacted: at most {largest} bytes");
        store.close().await;
        let store = FileStore::open_with(dir.path(), config).await.unwrap();
        let records = store.consumers().await.unwrap();
        assert_eq!(records.len(), 1000);
        assert!(
            records.iter().all(|r| r.last_seen_ms == 19),
            "the last line of each id wins"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_damaged_registry_is_set_aside_and_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let record = ConsumerRecord {
            id: ConsumerId::authorize("edge", "edge/a").unwrap(),
            endpoint: "a:1".to_owned(),
            labels: BTreeMap::new(),
            transport: "grpc".to_owned(),
            first_seen_ms: 1,
            last_seen_ms: 2,
            last_acked_revision: 3,
        };
        store.save_consumer(&record).await.unwrap();
        store.close().await;
        let path = dir.path().join(REGISTRY_FILE);
        let mut text = fs::read(&path).unwrap();
        text.extend_from_slice(b"{not json\n");
        text.extend_from_slice(&fs::read(&path).unwrap());
        fs::write(&path, text).unwrap();

        let store = open(dir.path()).await;
        assert_eq!(store.consumers().await.unwrap(), [record]);
        store.close().await;
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("consumers.jsonl.damaged-")),
            "{names:?}"
        );

        // An old whole-file registry that does not parse is set aside the same way.
        fs::remove_file(&path).unwrap();
        fs::write(dir.path().join(LEGACY_CONSUMERS_FILE), b"[{garbage").unwrap();
        let store = open(dir.path()).await;
        assert!(store.consumers().await.unwrap().is_empty());
        store.close().await;
    }

    #[tokio::test]
    async fn corruption_before_the_tail_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        commit_history(&store, 3).await;
        store.close().await;
        let mut log = fs::read(log_path(dir.path())).unwrap();
        // A bit flip inside the first record's payload; records 2 and 3 are intact.
        log[RECORD_HEADER + 10] ^= 0x01;
        fs::write(log_path(dir.path()), &log).unwrap();
        match FileStore::open(dir.path(), 1000).await {
            Err(StoreError::Corrupt(message)) => assert!(message.contains("byte 0"), "{message}"),
            Err(other) => panic!("expected corruption, got {other}"),
            Ok(_) => panic!("opened a log with damaged history"),
        }
    }

    #[tokio::test]
    async fn a_lost_epoch_or_log_is_corrupt_but_a_wiped_dir_starts_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let first_epoch = store.load().await.unwrap().epoch;
        commit_history(&store, 2).await;
        store.close().await;

        let log = fs::read(log_path(dir.path())).unwrap();
        fs::remove_file(log_path(dir.path())).unwrap();
        assert!(
            matches!(
                FileStore::open(dir.path(), 1000).await,
                Err(StoreError::Corrupt(m)) if m.contains("no change log")
            ),
            "a lost log must not restart revisions under the same epoch"
        );
        fs::write(log_path(dir.path()), log).unwrap();
        fs::remove_file(dir.path().join(EPOCH_FILE)).unwrap();
        assert!(matches!(
            FileStore::open(dir.path(), 1000).await,
            Err(StoreError::Corrupt(m)) if m.contains("no epoch file")
        ));

        fs::remove_dir_all(dir.path()).unwrap();
        let store = open(dir.path()).await;
        let state = store.load().await.unwrap();
        assert_eq!(state.head, 0);
        assert_ne!(state.epoch, first_epoch);
        store.close().await;
    }

    #[tokio::test]
    async fn compaction_bounds_the_log_and_reopens_to_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_compacting(dir.path(), 4, 10).await;
        commit_history(&store, 25).await;
        let before = store.load().await.unwrap();
        assert_eq!(before.head, 25);
        store.close().await;

        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        let logged = parse_log(&fs::read(log_path(dir.path())).unwrap())
            .unwrap()
            .batches
            .len();
        assert!(logged <= 10, "log holds {logged} records after compaction");

        let store = open_compacting(dir.path(), 4, 10).await;
        assert_eq!(store.load().await.unwrap(), before);
        // Immutability of a version published long before the snapshot.
        assert!(matches!(
            store.apply(put("w0", "0", b"other"), TS).await.unwrap(),
            Outcome::Conflict { .. }
        ));
        match store.changes_after(22, 10).await.unwrap() {
            Tail::Changes { changes, .. } => assert_eq!(
                changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
                [23, 24, 25]
            ),
            Tail::Gone { .. } => panic!("retained"),
        }
        assert!(matches!(
            store.changes_after(20, 10).await.unwrap(),
            Tail::Gone { .. }
        ));
        assert_eq!(commit(&store, put("new", "1", b"n")).await.revision, 26);
        store.close().await;
    }

    #[tokio::test]
    async fn a_crash_between_snapshot_and_fresh_log_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_compacting(dir.path(), 4, 1000).await;
        commit_history(&store, 12).await;
        let before = store.load().await.unwrap();
        store.close().await;
        let old_log = fs::read(log_path(dir.path())).unwrap();

        // Opening with a lower threshold compacts at once: snapshot at 12, empty log.
        let store = open_compacting(dir.path(), 4, 5).await;
        store.close().await;
        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        assert_eq!(fs::metadata(log_path(dir.path())).unwrap().len(), 0);

        // The crash: the snapshot is durable, the old log never got replaced, and the
        // temp files of both steps are lying around.
        fs::write(log_path(dir.path()), &old_log).unwrap();
        fs::write(dir.path().join("log.tmp"), b"").unwrap();
        fs::write(dir.path().join("snapshot.tmp"), b"half a snap").unwrap();

        let store = open_compacting(dir.path(), 4, 1000).await;
        assert_eq!(store.load().await.unwrap(), before);
        assert_eq!(
            fs::metadata(log_path(dir.path())).unwrap().len(),
            0,
            "the interrupted compaction is finished at open"
        );
        assert!(!dir.path().join("snapshot.tmp").exists());
        assert_eq!(commit(&store, put("new", "1", b"n")).await.revision, 13);
        let after = store.load().await.unwrap();
        store.close().await;

        let store = open_compacting(dir.path(), 4, 1000).await;
        assert_eq!(store.load().await.unwrap(), after);
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_applies_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()).await);

        // Sequential applies: one fsync each, so this is the fsync latency here.
        let sequential = 32;
        let started = Instant::now();
        for i in 0..sequential {
            commit(&store, put("seq", &i.to_string(), i.to_string().as_bytes())).await;
        }
        let per_apply = started.elapsed() / sequential;
        assert_eq!(store.log_syncs(), u64::from(sequential));

        let rounds = 20;
        let publishers = 64;
        let syncs_before = store.log_syncs();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..publishers {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for r in 0..rounds {
                    let code = format!("{p}-{r}");
                    commit(
                        &store,
                        put(&format!("p{p}"), &r.to_string(), code.as_bytes()),
                    )
                    .await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = started.elapsed();
        let applies = publishers * rounds;
        let syncs = store.log_syncs() - syncs_before;
        println!(
            "file store: sequential apply {per_apply:?} (≈ one fsync); {applies} applies from \
             {publishers} concurrent publishers in {elapsed:?} = {:.0}/s with {syncs} fsyncs \
             ({:.1} changes per fsync)",
            f64::from(applies) / elapsed.as_secs_f64(),
            f64::from(applies) / syncs as f64,
        );
        assert!(
            syncs < u64::from(applies),
            "{syncs} fsyncs for {applies} concurrent applies: nothing was batched"
        );
        let head = store.load().await.unwrap().head;
        assert_eq!(head, u64::from(sequential + applies));
        store.close().await;
    }

    #[tokio::test]
    async fn a_failed_fsync_fences_the_store_and_hides_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        commit(&store, put("a", "1", b"a")).await;
        let hint = store.head_hint();

        store.shared.fail_next_sync.store(true, Ordering::Relaxed);
        let error = store.apply(put("a", "2", b"b"), TS).await.unwrap_err();
        assert!(
            matches!(&error, StoreError::Unavailable(m) if m.contains("restart required")),
            "{error}"
        );
        assert_eq!(
            *hint.borrow(),
            1,
            "no hint for a change that is not durable"
        );
        assert_eq!(lock(&store.shared.view).durable, 1);
        for result in [
            store.load().await.map(drop),
            store.changes_after(0, 10).await.map(drop),
            store.apply(put("b", "1", b"b"), TS).await.map(drop),
            store.consumers().await.map(drop),
        ] {
            assert!(matches!(result, Err(StoreError::Unavailable(_))));
        }
        store.close().await;
    }

    #[tokio::test]
    async fn consumer_records_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let mut records = Vec::new();
        for id in ["edge-2", "edge-1", "edge-1/b"] {
            let record = ConsumerRecord {
                id: ConsumerId::authorize(id.split('/').next().unwrap(), id).unwrap(),
                endpoint: String::new(),
                labels: BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
                transport: "quic".to_owned(),
                first_seen_ms: 1,
                last_seen_ms: 2,
                last_acked_revision: 3,
            };
            store.save_consumer(&record).await.unwrap();
            records.push(record);
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(store.consumers().await.unwrap(), records);
        store.close().await;

        let store = open(dir.path()).await;
        assert_eq!(store.consumers().await.unwrap(), records);
        store.close().await;
    }

    #[tokio::test]
    async fn a_damaged_bundle_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        // Larger than the log carries, so nothing can repair it from there.
        let code = Bytes::from(vec![b'x'; CARRIED_MAX + 1]);
        let checksum = publish(&store, "shop", "v1", &code).await;
        let path = dir.path().join(BUNDLES_DIR).join(checksum.as_str());
        fs::write(&path, vec![b'y'; CARRIED_MAX + 1]).unwrap();
        assert!(matches!(
            store.bundle(&checksum).await,
            Err(StoreError::Corrupt(_))
        ));
        // Whatever its size, a file that does not hold the code is rewritten.
        store.put_bundle(&checksum, code.clone()).await.unwrap();
        assert_eq!(store.bundle(&checksum).await.unwrap(), Some(code));
        store.close().await;
    }

    /// Publishes `code` as `worker`@`version`: the bundle, then the change naming it.
    async fn publish(store: &FileStore, worker: &str, version: &str, code: &[u8]) -> Checksum {
        let checksum = Checksum::of(code);
        store
            .put_bundle(&checksum, Bytes::copy_from_slice(code))
            .await
            .unwrap();
        commit(store, put(worker, version, code)).await;
        checksum
    }

    #[tokio::test]
    async fn a_small_bundle_rides_in_the_log_and_comes_back_if_the_disk_lost_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let code = b"export default { fetch() { return new Response('carried') } }";
        let checksum = publish(&store, "shop", "v1", code).await;
        // One fsync for the change and its bundle together.
        assert_eq!(store.log_syncs(), 1);
        store.close().await;
        let log = fs::read(log_path(dir.path())).unwrap();
        assert!(
            log.windows(code.len()).any(|w| w == code),
            "code not in the log"
        );

        // As if the bundle file never reached the disk before a power cut.
        let path = dir.path().join(BUNDLES_DIR).join(checksum.as_str());
        fs::remove_file(&path).unwrap();
        assert_eq!(
            bundle_after_reopen(dir.path(), &checksum).await.as_deref(),
            Some(&code[..])
        );
        // Torn the same way, but damaged rather than missing.
        fs::write(&path, vec![0u8; code.len()]).unwrap();
        assert_eq!(
            bundle_after_reopen(dir.path(), &checksum).await.as_deref(),
            Some(&code[..])
        );
    }

    /// What a freshly opened store in `dir` reads for `checksum`.
    async fn bundle_after_reopen(dir: &Path, checksum: &Checksum) -> Option<Bytes> {
        let store = open(dir).await;
        let bundle = store.bundle(checksum).await.unwrap();
        store.close().await;
        bundle
    }

    #[tokio::test]
    async fn a_large_bundle_is_synced_on_its_own_and_stays_out_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let code: Vec<u8> = (0..CARRIED_MAX + 1).map(|i| (i % 251) as u8).collect();
        let checksum = publish(&store, "big", "v1", &code).await;
        store.close().await;
        let log = fs::read(log_path(dir.path())).unwrap();
        assert!(log.len() < 4096, "the log holds {} bytes", log.len());
        assert_eq!(
            bundle_after_reopen(dir.path(), &checksum).await.as_deref(),
            Some(&code[..])
        );
    }

    #[tokio::test]
    async fn compaction_keeps_the_bundles_the_log_carried() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_compacting(dir.path(), 2, 3).await;
        let mut published = Vec::new();
        for i in 0..5 {
            let code = format!("export default {{ version: {i} }}");
            let checksum = publish(&store, "shop", &format!("v{i}"), code.as_bytes()).await;
            published.push((checksum, code));
        }
        store.close().await;
        // Compacted after the fourth change: the fresh log carries only the fifth bundle.
        let log = fs::read(log_path(dir.path())).unwrap();
        for (i, (_, code)) in published.iter().enumerate() {
            let carried = log.windows(code.len()).any(|w| w == code.as_bytes());
            assert_eq!(carried, i == 4, "bundle {i} carried: {carried}");
        }
        let store = open(dir.path()).await;
        for (checksum, code) in &published {
            assert_eq!(
                store.bundle(checksum).await.unwrap().as_deref(),
                Some(code.as_bytes())
            );
        }
        store.close().await;
    }

    #[tokio::test]
    async fn publishes_write_their_own_bundles_while_the_flusher_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        // As if the flusher had this many carried bundles still to write.
        lock(&store.shared.bundles)
            .unflushed
            .extend((0..MAX_UNFLUSHED).map(|i| {
                let code = Bytes::from(format!("export default {{ waiting: {i} }}"));
                (Checksum::of(&code), code)
            }));
        let code = b"export default { late: true }";
        let checksum = publish(&store, "shop", "v1", code).await;
        let path = dir.path().join(BUNDLES_DIR).join(checksum.as_str());
        assert_eq!(fs::read(&path).unwrap(), code, "written before its commit");
        assert!(
            !lock(&store.shared.bundles)
                .uncarried
                .contains_key(&checksum)
        );
        let log = fs::read(log_path(dir.path())).unwrap();
        assert!(!log.windows(code.len()).any(|w| w == code), "not carried");
        lock(&store.shared.bundles).unflushed.clear();
        store.close().await;
    }

    #[tokio::test]
    async fn bundles_of_publishes_that_never_commit_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        for i in 0..MAX_UNCARRIED + 10 {
            let code = format!("export default {{ abandoned: {i} }}");
            store
                .put_bundle(&Checksum::of(code.as_bytes()), Bytes::from(code))
                .await
                .unwrap();
        }
        let waiting = lock(&store.shared.bundles).uncarried.len();
        assert_eq!(
            waiting, 10,
            "the full set was written out and forgotten, then 10 more"
        );
        // A later publish of one of the forgotten bundles is durable without being carried.
        let code = b"export default { abandoned: 0 }";
        publish(&store, "shop", "v1", code).await;
        store.close().await;
        let log = fs::read(log_path(dir.path())).unwrap();
        assert!(!log.windows(code.len()).any(|w| w == code));
    }
}
