//! Several cores as one, end to end: real `workerpush core` processes sharing one Redis (the
//! one `.ci/run` keeps at 127.0.0.1:6379, or a private `redis-server` the test kills), real
//! mTLS gRPC subscribers and the signed hook. Each test keeps its state under a key prefix of
//! its own and deletes it at the end, so tests run in parallel and leave nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use common::{
    BIN, TestServer, common_ports, grpc_session, grpc_transport, signed_put_request,
    status_and_json,
};
use futures_util::{StreamExt, stream};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use workerpush::{
    client::{Consumer, ConsumerOptions, FailoverTransport, Handler, Session, Transport},
    pb::{AckRequest, RegisterRequest, SubscribeRequest, UpdateKind, WorkerUpdate},
    store::{ConsumerRecord, RedisConfig, RedisStore, Store},
};

const REDIS: &str = "redis://127.0.0.1:6379";
const HOOK_SECRET: &str = "cluster-test-hook-secret";
const UPLOAD_TOKEN: &str = "cluster-test-upload-token";

// ---------------------------------------------------------------------------------------------
// Harness: key prefixes, cores sharing certificates, the hook, subscription feeds.
// ---------------------------------------------------------------------------------------------

/// A key prefix of the test's own; its keys are deleted on drop, even when the test fails.
struct Prefix {
    url: String,
    name: String,
}

impl Prefix {
    fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            name: format!("wpcluster-{}", hex::encode(rand::random::<[u8; 6]>())),
        }
    }

    /// A store of our own on the cores' state, to read the truth from Redis.
    fn store(&self) -> RedisStore {
        RedisStore::connect(RedisConfig {
            url: self.url.clone(),
            key_prefix: self.name.clone(),
            ..RedisConfig::default()
        })
        .unwrap()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        // Best effort: a private Redis may already be gone with its data.
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return;
        };
        let mut cursor = 0_u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.name))
                .arg("COUNT")
                .arg(1000)
                .query(&mut connection)
            else {
                return;
            };
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut connection);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

/// Cores on one Redis prefix, each in its own directory, all with the same certificates.
struct Cluster {
    cores: Vec<TestServer>,
    /// The certificates every core and client uses.
    certs: PathBuf,
    prefix: Prefix,
    _dirs: Vec<TempDir>,
}

impl Cluster {
    fn start(url: &str, count: usize) -> Self {
        let prefix = Prefix::new(url);
        let template = tempfile::tempdir().unwrap();
        let certs = template.path().join("certs");
        let made = std::process::Command::new(BIN)
            .args(["certs", "--out"])
            .arg(&certs)
            .args(["--client", "consumer-1"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(made.success(), "workerpush certs failed");
        let mut dirs = vec![template];
        let mut cores = Vec::new();
        for _ in 0..count {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(&certs, &dir.path().join("certs"));
            cores.push(start_core(dir.path(), url, &prefix.name));
            dirs.push(dir);
        }
        Self {
            cores,
            certs,
            prefix,
            _dirs: dirs,
        }
    }

    fn grpc(&self, core: usize) -> SocketAddr {
        self.cores[core].addr("grpc")
    }

    fn http(&self, core: usize) -> SocketAddr {
        self.cores[core].addr("http")
    }

    async fn session(&self, core: usize) -> Box<dyn Session> {
        grpc_session(&self.certs, self.grpc(core), "consumer-1").await
    }

    /// A fresh subscription to every worker on `core`, read until its first SYNCED.
    async fn feed(&self, core: usize) -> Feed {
        let feed = Feed::start(self.session(core).await, subscribe("", 0)).await;
        until(Duration::from_secs(10), "the first SYNCED", || {
            feed.count(UpdateKind::Synced) > 0
        })
        .await;
        feed
    }
}

fn start_core(dir: &Path, url: &str, prefix: &str) -> TestServer {
    let mut args = vec!["core"];
    args.extend(common_ports());
    args.extend(["--redis-url", url, "--redis-key-prefix", prefix]);
    TestServer::start(
        dir,
        &args,
        &[("HOOK_SECRET", HOOK_SECRET), ("UPLOAD_TOKEN", UPLOAD_TOKEN)],
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            // `fs::copy` keeps the permissions: private keys stay 0600.
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Publishes and deletes through a core's signed hook, with one HTTP client for all requests.
#[derive(Clone)]
struct Hook {
    client: reqwest::Client,
}

/// What the hook answered: the status and JSON body, or why there was no answer.
type Answer = Result<(u16, serde_json::Value), String>;

impl Hook {
    fn new() -> Self {
        workerpush::tls::install_crypto_provider();
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
        }
    }

    async fn put(&self, core: SocketAddr, worker: &str, version: &str, code: &[u8]) -> Answer {
        let request =
            signed_put_request(&self.client, core, HOOK_SECRET, "", worker, version, code);
        let response = request.send().await.map_err(|e| format!("{e:?}"))?;
        Ok(status_and_json(response).await)
    }

    /// A put that must be accepted as a new change: its revision.
    async fn committed(&self, core: SocketAddr, worker: &str, version: &str) -> u64 {
        let (status, body) = self
            .put(core, worker, version, code(worker, version).as_bytes())
            .await
            .unwrap();
        assert_eq!(status, 201, "{body}");
        body["revision"].as_u64().unwrap()
    }

    async fn ready(&self, core: SocketAddr) -> Option<u16> {
        let response = self
            .client
            .get(format!("http://{core}/readyz"))
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }
}

fn code(worker: &str, version: &str) -> String {
    format!("export default {{ worker: '{worker}', version: '{version}' }}")
}

fn subscribe(epoch: &str, resume: u64) -> SubscribeRequest {
    SubscribeRequest {
        consumer_id: String::new(),
        worker_names: Vec::new(),
        resume_revision: resume,
        epoch: epoch.to_owned(),
    }
}

fn kind(update: &WorkerUpdate) -> UpdateKind {
    UpdateKind::try_from(update.kind).unwrap_or(UpdateKind::Unspecified)
}

/// One subscription read in the background: every update, and how the stream ended.
struct Feed {
    updates: Arc<Mutex<Vec<WorkerUpdate>>>,
    ended: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl Feed {
    async fn start(session: Box<dyn Session>, request: SubscribeRequest) -> Self {
        let mut stream = session.subscribe(request).await.unwrap();
        let updates = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let task = tokio::spawn({
            let (updates, ended) = (updates.clone(), ended.clone());
            async move {
                // Holds the session for as long as the stream is read.
                let _session = session;
                let why = loop {
                    match stream.next().await {
                        Some(Ok(update)) => updates.lock().unwrap().push(update),
                        Some(Err(error)) => break error.to_string(),
                        None => break "stream ended".to_owned(),
                    }
                };
                *ended.lock().unwrap() = Some(why);
            }
        });
        Self {
            updates,
            ended,
            task,
        }
    }

    fn all(&self) -> Vec<WorkerUpdate> {
        self.updates.lock().unwrap().clone()
    }

    fn count(&self, wanted: UpdateKind) -> usize {
        self.all().iter().filter(|u| kind(u) == wanted).count()
    }

    /// PUTs and DELETEs after the first SYNCED: the live changes.
    fn changes(&self) -> Vec<WorkerUpdate> {
        self.all()
            .into_iter()
            .skip_while(|u| kind(u) != UpdateKind::Synced)
            .filter(|u| matches!(kind(u), UpdateKind::Put | UpdateKind::Delete))
            .collect()
    }

    fn revisions(&self) -> Vec<u64> {
        self.changes().iter().map(|u| u.revision).collect()
    }

    /// Worker → version, applying everything received as a consumer would.
    fn state(&self) -> BTreeMap<String, String> {
        let mut state = BTreeMap::new();
        for update in self.all() {
            match kind(&update) {
                UpdateKind::Reset => state.clear(),
                UpdateKind::Put => {
                    state.insert(update.worker_name, update.version);
                }
                UpdateKind::Delete => {
                    state.remove(&update.worker_name);
                }
                _ => {}
            }
        }
        state
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `check` holds, looking every 20 ms, up to `within`.
async fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Worker → version as Redis holds it: the truth every subscriber must converge to.
async fn store_state(store: &RedisStore) -> (u64, BTreeMap<String, String>) {
    let state = store.load().await.unwrap();
    let latest = state
        .latest
        .into_iter()
        .map(|c| (c.worker.to_string(), c.version.to_string()))
        .collect();
    (state.head, latest)
}

/// `1..=head`, what a subscriber that started fresh at revision 0 must have seen.
fn every_revision(head: u64) -> Vec<u64> {
    (1..=head).collect()
}

// ---------------------------------------------------------------------------------------------
// Two cores, one history.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_either_core_reach_subscribers_on_both_in_order_and_resume_anywhere() {
    let cluster = Cluster::start(REDIS, 2);
    let hook = Hook::new();
    let feeds = [cluster.feed(0).await, cluster.feed(1).await];

    let mut expected = Vec::new();
    for i in 0..10_u64 {
        let (worker, version) = (format!("w{}", i % 3), format!("v{i}"));
        // Even changes through core A, odd through core B.
        let revision = hook
            .committed(cluster.http((i % 2) as usize), &worker, &version)
            .await;
        expected.push((revision, worker, version));
    }
    assert_eq!(
        expected.iter().map(|e| e.0).collect::<Vec<_>>(),
        every_revision(10),
        "one revision order across both cores"
    );
    for (core, feed) in feeds.iter().enumerate() {
        until(Duration::from_secs(10), "ten changes on each core", || {
            feed.changes().len() >= 10
        })
        .await;
        let seen: Vec<_> = feed
            .changes()
            .into_iter()
            .map(|u| (u.revision, u.worker_name, u.version))
            .collect();
        assert_eq!(seen, expected, "subscriber on core {core}");
    }
    let epoch = feeds[0].changes()[0].epoch.clone();
    assert!(feeds[1].changes().iter().all(|u| u.epoch == epoch));

    // A consumer that held revision 4 on core A resumes on core B, and the other way round.
    for (from, to) in [(0, 1), (1, 0)] {
        let held = feeds[from].changes()[3].revision;
        let resumed = Feed::start(cluster.session(to).await, subscribe(&epoch, held)).await;
        until(Duration::from_secs(10), "the replay's SYNCED", || {
            resumed.count(UpdateKind::Synced) > 0
        })
        .await;
        let updates = resumed.all();
        assert_eq!(kind(&updates[0]), UpdateKind::Put, "replay, not RESET");
        assert_eq!(
            updates
                .iter()
                .map(|u| (kind(u), u.revision))
                .collect::<Vec<_>>(),
            (5..=10)
                .map(|r| (UpdateKind::Put, r))
                .chain([(UpdateKind::Synced, 10)])
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_changes_through_both_cores_arrive_in_one_order_everywhere() {
    const CHANGES: u64 = 1000;
    let cluster = Cluster::start(REDIS, 2);
    let hook = Hook::new();
    let feeds = [
        cluster.feed(0).await,
        cluster.feed(0).await,
        cluster.feed(1).await,
        cluster.feed(1).await,
    ];

    let started = Instant::now();
    let answers: Vec<(u64, String, String)> = stream::iter(0..CHANGES)
        .map(|i| {
            let (hook, core) = (hook.clone(), cluster.http((i % 2) as usize));
            async move {
                let (worker, version) = (format!("w{}", i % 25), format!("v{i}"));
                let revision = hook.committed(core, &worker, &version).await;
                (revision, worker, version)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let published = started.elapsed();
    let mut by_revision = answers;
    by_revision.sort();
    assert_eq!(
        by_revision.iter().map(|a| a.0).collect::<Vec<_>>(),
        every_revision(CHANGES),
        "every accepted change got its own revision, none skipped"
    );

    for feed in &feeds {
        until(
            Duration::from_secs(20),
            "every change on every subscriber",
            || feed.changes().len() as u64 >= CHANGES,
        )
        .await;
    }
    let delivered = started.elapsed();
    let reference: Vec<_> = feeds[0]
        .changes()
        .into_iter()
        .map(|u| (u.revision, u.worker_name, u.version))
        .collect();
    assert_eq!(
        reference, by_revision,
        "revisions as the hook answered them"
    );
    for (i, feed) in feeds.iter().enumerate() {
        assert_eq!(
            feed.count(UpdateKind::Reset),
            1,
            "subscriber {i} reset again"
        );
        let seen: Vec<_> = feed
            .changes()
            .into_iter()
            .map(|u| (u.revision, u.worker_name, u.version))
            .collect();
        assert_eq!(seen, reference, "subscriber {i} (core {})", i / 2);
    }
    println!(
        "{CHANGES} changes through two cores (32 in flight): all answered in {published:?}, \
         all delivered to 4 subscribers in {delivered:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Failover: a core killed mid-stream.
// ---------------------------------------------------------------------------------------------

/// What the consumer applied, and over which connection.
#[derive(Default)]
struct Applied {
    connections: usize,
    resets: usize,
    snapshot_syncs: usize,
    /// (connection number, revision, worker, version); DELETEs have an empty version.
    changes: Vec<(usize, u64, String, String)>,
    state: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Applied>>);

impl Recorder {
    fn with<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        f(&self.0.lock().unwrap())
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn put(&mut self, update: &WorkerUpdate, code: Bytes) -> Result<(), String> {
        assert_eq!(
            code,
            crate::code(&update.worker_name, &update.version).as_bytes()
        );
        let mut applied = self.0.lock().unwrap();
        let connection = applied.connections;
        applied.changes.push((
            connection,
            update.revision,
            update.worker_name.clone(),
            update.version.clone(),
        ));
        applied
            .state
            .insert(update.worker_name.clone(), update.version.clone());
        Ok(())
    }

    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String> {
        let mut applied = self.0.lock().unwrap();
        let connection = applied.connections;
        applied.changes.push((
            connection,
            update.revision,
            update.worker_name.clone(),
            String::new(),
        ));
        applied.state.remove(&update.worker_name);
        Ok(())
    }

    async fn reset(&mut self, _update: &WorkerUpdate) {
        let mut applied = self.0.lock().unwrap();
        applied.resets += 1;
        applied.state.clear();
    }

    async fn synced(&mut self, _update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>) {
        if snapshot.is_some() {
            self.0.lock().unwrap().snapshot_syncs += 1;
        }
    }

    fn connected(&mut self, _transport: &str) {
        self.0.lock().unwrap().connections += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_of_a_killed_core_resume_on_the_other_with_nothing_lost() {
    let mut cluster = Cluster::start(REDIS, 2);
    let hook = Hook::new();
    let servers: Vec<Box<dyn Transport>> = (0..2)
        .map(|core| {
            Box::new(grpc_transport(
                &cluster.certs,
                cluster.grpc(core),
                "consumer-1",
            )) as Box<dyn Transport>
        })
        .collect();
    let options = ConsumerOptions {
        ack: true,
        endpoint: Some("edge-1.example:443".to_owned()),
        ..ConsumerOptions::default()
    };
    let mut consumer = Consumer::new(FailoverTransport::new(servers).unwrap(), options, None);
    let recorder = Recorder::default();
    let stop_consumer = CancellationToken::new();
    let consuming = tokio::spawn({
        let (mut recorder, stop) = (recorder.clone(), stop_consumer.clone());
        async move { consumer.run(&mut recorder, stop).await }
    });
    until(Duration::from_secs(10), "the consumer on core A", || {
        recorder.with(|a| a.snapshot_syncs == 1)
    })
    .await;

    // Uploads go on through both cores, then through core B alone once A is dead.
    let a_alive = Arc::new(AtomicBool::new(true));
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let uploading = tokio::spawn({
        let (hook, stop, a_alive, accepted) = (
            hook.clone(),
            stop.clone(),
            a_alive.clone(),
            accepted.clone(),
        );
        let http = [cluster.http(0), cluster.http(1)];
        async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let core = if i % 2 == 0 && a_alive.load(Ordering::SeqCst) {
                    0
                } else {
                    1
                };
                let (worker, version) = (format!("w{}", i % 7), format!("v{i}"));
                // An upload to core A while it dies has no answer: it may or may not be in.
                if let Ok((status, body)) = hook
                    .put(
                        http[core],
                        &worker,
                        &version,
                        code(&worker, &version).as_bytes(),
                    )
                    .await
                {
                    assert_eq!(status, 201, "core {core}: {body}");
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
            }
        }
    });

    until(
        Duration::from_secs(10),
        "ten changes through core A",
        || recorder.with(|a| a.changes.len() >= 10),
    )
    .await;
    cluster.cores[0].kill9();
    a_alive.store(false, Ordering::SeqCst);
    let at_kill = accepted.load(Ordering::SeqCst);
    until(
        Duration::from_secs(10),
        "twenty more uploads through core B",
        || accepted.load(Ordering::SeqCst) >= at_kill + 20,
    )
    .await;
    stop.cancel();
    uploading.await.unwrap();

    let store = cluster.prefix.store();
    let (head, truth) = store_state(&store).await;
    until(Duration::from_secs(10), "the consumer at the head", || {
        recorder.with(|a| a.changes.last().is_some_and(|c| c.1 >= head))
    })
    .await;
    stop_consumer.cancel();
    consuming.await.unwrap().unwrap();

    recorder.with(|applied| {
        let revisions: Vec<u64> = applied.changes.iter().map(|c| c.1).collect();
        assert_eq!(
            revisions,
            every_revision(head),
            "every change once, in order"
        );
        assert_eq!(
            (applied.connections, applied.resets, applied.snapshot_syncs),
            (2, 1, 1),
            "one connection to each core; the second resumed without RESET"
        );
        let on_a = applied.changes.iter().filter(|c| c.0 == 1).count();
        assert!(
            on_a >= 10 && on_a < applied.changes.len(),
            "killed mid-stream: {on_a} of {} changes came from core A",
            applied.changes.len()
        );
        assert_eq!(applied.state, truth);
    });

    // Both cores recorded the consumer in Redis; its acks reached the head through core B.
    let mut record = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while record
        .as_ref()
        .is_none_or(|r: &ConsumerRecord| r.last_acked_revision < head)
    {
        assert!(
            Instant::now() < deadline,
            "acks did not reach {head}: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        record = store.consumers().await.unwrap().into_iter().next();
    }
    let record = record.unwrap();
    assert_eq!(
        (
            record.id.as_str(),
            record.endpoint.as_str(),
            record.transport.as_str()
        ),
        ("consumer-1", "edge-1.example:443", "grpc")
    );
    assert!(record.first_seen_ms <= record.last_seen_ms);
}

// ---------------------------------------------------------------------------------------------
// Redis itself goes away.
// ---------------------------------------------------------------------------------------------

/// A private `redis-server` that keeps every acknowledged write across `kill -9` (append-only
/// file, fsync on every write), on a free port, in a temp dir.
struct PrivateRedis {
    port: u16,
    dir: TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, on the same port and data) and waits until it answers PING.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `kill -9`.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every answer the hook gave during the test.
#[derive(Default)]
struct Ledger {
    /// (worker, version, status, body); each worker name is used once.
    answers: Vec<(String, String, u16, serde_json::Value)>,
}

impl Ledger {
    fn count(&self, status: u16) -> usize {
        self.answers.iter().filter(|a| a.2 == status).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_while_redis_is_down_are_refused_or_durable_and_everyone_converges() {
    let mut redis = PrivateRedis::start().await;
    let cluster = Cluster::start(&redis.url(), 2);
    let hook = Hook::new();
    let feeds = [cluster.feed(0).await, cluster.feed(1).await];
    // And a consumer that acknowledges what it applies, through the outage.
    let options = ConsumerOptions {
        ack: true,
        ..ConsumerOptions::default()
    };
    let transport = grpc_transport(&cluster.certs, cluster.grpc(0), "consumer-1");
    let mut consumer = Consumer::new(transport, options, None);
    let recorder = Recorder::default();
    let stop_consumer = CancellationToken::new();
    let consuming = tokio::spawn({
        let (mut recorder, stop) = (recorder.clone(), stop_consumer.clone());
        async move { consumer.run(&mut recorder, stop).await }
    });

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let next = Arc::new(AtomicUsize::new(0));
    let uploaders: Vec<_> = (0..4)
        .map(|_| {
            let (hook, ledger, stop, next) =
                (hook.clone(), ledger.clone(), stop.clone(), next.clone());
            let http = [cluster.http(0), cluster.http(1)];
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let (worker, version) = (format!("w{i}"), "1".to_owned());
                    let (status, body) = hook
                        .put(
                            http[i % 2],
                            &worker,
                            &version,
                            code(&worker, &version).as_bytes(),
                        )
                        .await
                        .unwrap();
                    ledger
                        .lock()
                        .unwrap()
                        .answers
                        .push((worker, version, status, body));
                    if status == 503 {
                        // Refused: give the cores a moment rather than spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();

    until(Duration::from_secs(10), "uploads accepted", || {
        ledger.lock().unwrap().count(201) >= 20
    })
    .await;
    redis.kill();
    let accepted_before = ledger.lock().unwrap().count(201);
    until(Duration::from_secs(10), "503s from both cores", || {
        let ledger = ledger.lock().unwrap();
        let refused = |core: usize| {
            ledger
                .answers
                .iter()
                .filter(|a| a.2 == 503 && a.0[1..].parse::<usize>().unwrap() % 2 == core)
                .count()
        };
        refused(0) >= 5 && refused(1) >= 5
    })
    .await;
    for core in 0..2 {
        let mut ready = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while ready != Some(503) {
            assert!(
                Instant::now() < deadline,
                "core {core} still ready: {ready:?}"
            );
            ready = hook.ready(cluster.http(core)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (core, feed) in feeds.iter().enumerate() {
        assert_eq!(feed.ended(), None, "core {core} ended a live stream");
    }

    redis.restart().await;
    until(Duration::from_secs(15), "uploads accepted again", || {
        ledger.lock().unwrap().count(201) >= accepted_before + 20
    })
    .await;
    stop.cancel();
    for uploader in uploaders {
        uploader.await.unwrap();
    }

    let answers = std::mem::take(&mut ledger.lock().unwrap().answers);
    let mut refused = BTreeSet::new();
    let mut accepted = BTreeMap::new();
    for (worker, version, status, body) in &answers {
        match status {
            201 => {
                accepted.insert(worker.clone(), version.clone());
            }
            503 => {
                refused.insert(worker.clone());
            }
            other => panic!("{worker}: {other} {body}"),
        }
    }
    let store = cluster.prefix.store();
    let (head, truth) = store_state(&store).await;
    for (worker, version) in &accepted {
        assert_eq!(
            truth.get(worker),
            Some(version),
            "{worker} was answered 201 but is not in Redis"
        );
    }
    let ambiguous: Vec<_> = truth.keys().filter(|w| refused.contains(*w)).collect();
    assert_eq!(
        truth.len(),
        accepted.len() + ambiguous.len(),
        "only what was uploaded is in Redis"
    );
    for (core, feed) in feeds.iter().enumerate() {
        until(
            Duration::from_secs(10),
            "every subscriber at the head",
            || feed.revisions().last().is_some_and(|r| *r >= head),
        )
        .await;
        assert_eq!(
            feed.revisions(),
            every_revision(head),
            "core {core}: every change once, in order"
        );
        assert_eq!(feed.count(UpdateKind::Reset), 1, "core {core}: no RESET");
        assert_eq!(feed.state(), truth, "core {core}");
        assert_eq!(feed.ended(), None, "core {core} ended a live stream");
        assert_eq!(hook.ready(cluster.http(core)).await, Some(200));
    }
    until(
        Duration::from_secs(10),
        "the acking consumer at the head",
        || recorder.with(|a| a.changes.last().is_some_and(|c| c.1 >= head)),
    )
    .await;
    stop_consumer.cancel();
    consuming.await.unwrap().unwrap();
    recorder.with(|applied| {
        assert_eq!(
            (applied.connections, applied.resets),
            (1, 1),
            "one stream throughout"
        );
        assert_eq!(applied.state, truth);
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked < head {
        assert!(
            Instant::now() < deadline,
            "acks stopped at {acked} of {head}: lost in the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        acked = store
            .consumers()
            .await
            .unwrap()
            .first()
            .map_or(0, |r| r.last_acked_revision);
    }
    println!(
        "Redis killed and restarted: {} accepted, {} refused with 503 ({} of those were \
         committed after all: the answer was lost with Redis), head {head}",
        accepted.len(),
        refused.len(),
        ambiguous.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The consumer registry.
// ---------------------------------------------------------------------------------------------

async fn ack(session: &dyn Session, revision: u64) {
    session
        .ack(AckRequest {
            consumer_id: String::new(),
            worker_name: "w".to_owned(),
            revision,
            applied: true,
            error: String::new(),
        })
        .await
        .unwrap();
}

/// The one consumer in the registry once `done` holds (cores write the registry in the
/// background, within milliseconds).
async fn registry_record(
    store: &RedisStore,
    what: &str,
    done: impl Fn(&ConsumerRecord) -> bool,
) -> ConsumerRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = store.consumers().await.unwrap();
        assert!(records.len() <= 1, "{records:?}");
        if let Some(record) = records.into_iter().next().filter(&done) {
            return record;
        }
        assert!(Instant::now() < deadline, "registry never showed {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_registry_is_shared_by_every_core_and_survives_restarts() {
    let mut cluster = Cluster::start(REDIS, 2);
    let store = cluster.prefix.store();
    let expect = |record: &ConsumerRecord, acked: u64| {
        assert_eq!(
            (
                record.id.as_str(),
                record.endpoint.as_str(),
                record.labels.get("region").map(String::as_str),
                record.transport.as_str(),
                record.last_acked_revision,
            ),
            ("consumer-1", "10.1.1.1:443", Some("eu"), "grpc", acked)
        );
        assert!(record.first_seen_ms <= record.last_seen_ms);
    };

    let on_a = cluster.session(0).await;
    on_a.register(RegisterRequest {
        consumer_id: String::new(),
        endpoint: "10.1.1.1:443".to_owned(),
        labels: [("region".to_owned(), "eu".to_owned())].into(),
    })
    .await
    .unwrap();
    ack(&*on_a, 5).await;
    let record = registry_record(&store, "the ack through core A", |r| {
        r.last_acked_revision == 5
    })
    .await;
    expect(&record, 5);

    // Core B knows nothing of the registration, and gets a late, lower ack.
    let on_b = cluster.session(1).await;
    let before = workerpush::core::now_ms();
    ack(&*on_b, 3).await;
    let record = registry_record(&store, "the ack through core B", |r| {
        r.last_seen_ms >= before
    })
    .await;
    expect(&record, 5);

    // Both cores restart; what they load, and what they save next, keeps what is known.
    drop((on_a, on_b));
    for core in &mut cluster.cores {
        core.kill9();
    }
    let restarted: Vec<_> = cluster
        .cores
        .iter()
        .map(TestServer::restart_same_ports)
        .collect();
    cluster.cores = restarted;
    ack(&*cluster.session(1).await, 9).await;
    registry_record(&store, "the ack through restarted core B", |r| {
        r.last_acked_revision == 9
    })
    .await;
    let before = workerpush::core::now_ms();
    ack(&*cluster.session(0).await, 7).await;
    let record = registry_record(&store, "the ack through restarted core A", |r| {
        r.last_seen_ms >= before
    })
    .await;
    expect(&record, 9);
}

// ---------------------------------------------------------------------------------------------
// The default stays embedded.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn serve_dev_keeps_its_state_in_the_data_dir_and_never_touches_redis() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = Prefix::new(REDIS);
    // Even with a key prefix in its environment, no `REDIS_URL` means the embedded store.
    let mut args = vec!["serve", "--dev", "--upload-port", "0"];
    args.extend(common_ports());
    let server = TestServer::start(dir.path(), &args, &[("REDIS_KEY_PREFIX", &prefix.name)]);
    let (secret, _) = server.secrets();
    let (status, body) =
        common::hook_put(server.addr("http"), &secret, "a", "1", b"embedded").await;
    assert_eq!(status, 201, "{body}");
    let data: Vec<_> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .collect();
    assert!(!data.is_empty(), "nothing in ./data");

    let client = redis::Client::open(REDIS).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", prefix.name))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(keys.is_empty(), "serve --dev wrote to Redis: {keys:?}");
}

// ---------------------------------------------------------------------------------------------
// A core that lags behind the shared history (see the report on `Hub::can_resume`).
// ---------------------------------------------------------------------------------------------

/// A TCP proxy in front of Redis that can hold every byte in both directions: the core behind
/// it sees a Redis that stopped answering, without any other core noticing.
struct Valve {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Valve {
    async fn start(to: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = watch::channel(true);
        let task = tokio::spawn({
            let open = open.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, open.subscribe()));
                    tokio::spawn(pump(server_read, client_write, open.subscribe()));
                }
            }
        });
        Self { addr, open, task }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn set(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for Valve {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: watch::Receiver<bool>,
) {
    let mut buffer = vec![0; 16 << 10];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 || open.wait_for(|open| *open).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A consumer that learned revision R from core A and reconnects to core B before B's
/// follower has read R (here: B's Redis connection is held) gets a replay, not a RESET: B
/// waits (briefly) for its follower to reach R.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_a_core_that_has_not_caught_up_yet_replays_instead_of_resetting() {
    let valve = Valve::start("127.0.0.1:6379").await;
    let mut cluster = Cluster::start(REDIS, 1);
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&cluster.certs, &dir.path().join("certs"));
    cluster
        .cores
        .push(start_core(dir.path(), &valve.url(), &cluster.prefix.name));
    cluster._dirs.push(dir);
    let hook = Hook::new();
    let on_b = cluster.feed(1).await;
    hook.committed(cluster.http(0), "a", "1").await;
    until(Duration::from_secs(10), "core B at revision 1", || {
        on_b.revisions() == [1]
    })
    .await;
    let epoch = on_b.changes()[0].epoch.clone();

    valve.set(false);
    let held = hook.committed(cluster.http(0), "a", "2").await;
    let resumed = Feed::start(cluster.session(1).await, subscribe(&epoch, held)).await;
    valve.set(true);
    until(
        Duration::from_secs(10),
        "the resumed stream's SYNCED",
        || resumed.count(UpdateKind::Synced) > 0,
    )
    .await;
    let first = resumed.all()[0].clone();
    assert_eq!(
        (kind(&first), first.revision),
        (UpdateKind::Synced, held),
        "nothing to replay after {held}: SYNCED, not RESET"
    );
}

/// An ack through a core that saw an older registration does not bring that registration back:
/// `Core::ack` saves the ack alone (no endpoint, no labels), and the store merges by "newest
/// save that carries a registration".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_through_one_core_does_not_undo_a_newer_registration_through_another() {
    let cluster = Cluster::start(REDIS, 2);
    let store = cluster.prefix.store();
    let register = |endpoint: &str| RegisterRequest {
        consumer_id: String::new(),
        endpoint: endpoint.to_owned(),
        labels: Default::default(),
    };
    let (on_a, on_b) = (cluster.session(0).await, cluster.session(1).await);
    on_b.register(register("old.example:443")).await.unwrap();
    registry_record(&store, "the registration through core B", |r| {
        r.endpoint == "old.example:443"
    })
    .await;
    on_a.register(register("new.example:443")).await.unwrap();
    registry_record(&store, "the registration through core A", |r| {
        r.endpoint == "new.example:443"
    })
    .await;
    let before = workerpush::core::now_ms();
    ack(&*on_b, 1).await;
    let record = registry_record(&store, "the ack through core B", |r| {
        r.last_seen_ms >= before
    })
    .await;
    assert_eq!(record.endpoint, "new.example:443");
}

// ---------------------------------------------------------------------------------------------
// SYNCED is never stale, a lost store never empties the edge, a hook request applies once.
// ---------------------------------------------------------------------------------------------

/// Reads `request`'s stream on `session` up to and including its first SYNCED.
async fn until_first_synced(session: &dyn Session, request: SubscribeRequest) -> Vec<WorkerUpdate> {
    let mut stream = session.subscribe(request).await.unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let update = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("no SYNCED within 10 s")
            .expect("stream ended before SYNCED")
            .unwrap();
        let synced = kind(&update) == UpdateKind::Synced;
        seen.push(update);
        if synced {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_on_another_core_covers_every_change_acknowledged_before_the_subscription() {
    let cluster = Cluster::start(REDIS, 2);
    let hook = Hook::new();
    let on_b = cluster.session(1).await;
    let (status, body) = hook
        .put(cluster.http(0), "start", "1", b"start")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let epoch = body["epoch"].as_str().unwrap().to_owned();
    let mut learned = body["revision"].as_u64().unwrap();
    for round in 0..30 {
        let worker = format!("w{round}");
        let revision = hook.committed(cluster.http(0), &worker, "1").await;
        // At once, on core B: fresh, and resuming from the revision learned before.
        let (fresh, resumed) = tokio::join!(
            until_first_synced(&*on_b, subscribe("", 0)),
            until_first_synced(&*on_b, subscribe(&epoch, learned)),
        );
        for (how, updates) in [("fresh", &fresh), ("resumed", &resumed)] {
            let synced = updates.last().unwrap();
            assert!(
                synced.revision >= revision,
                "round {round}, {how}: SYNCED at {} before the acknowledged {revision}",
                synced.revision
            );
            assert!(
                updates.iter().any(|u| kind(u) == UpdateKind::Put
                    && u.worker_name == worker
                    && u.revision == revision),
                "round {round}, {how}: {worker}@{revision} missing before SYNCED: {:?}",
                updates
                    .iter()
                    .map(|u| (kind(u), u.worker_name.clone(), u.revision))
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(
            kind(&resumed[0]),
            UpdateKind::Put,
            "round {round}: a replay, not a RESET"
        );
        learned = revision;
    }
}

/// One signed hook request, kept to be sent again as it is (a replay).
struct SignedRequest {
    timestamp: i64,
    signature: String,
    boundary: String,
    body: Vec<u8>,
}

impl SignedRequest {
    fn new(metadata: serde_json::Value, code: Option<&[u8]>) -> Self {
        let metadata = metadata.to_string();
        let mut fields = vec![("metadata", None, metadata.as_bytes())];
        if let Some(code) = code {
            fields.push(("worker_code", Some("worker.js"), code));
        }
        let (boundary, body) = common::multipart(&fields);
        let timestamp = workerpush::core::now_ms() / 1000;
        let signature = workerpush::http::signing::sign(HOOK_SECRET.as_bytes(), timestamp, &body);
        Self {
            timestamp,
            signature,
            boundary,
            body,
        }
    }

    fn put(worker: &str, version: &str, code: &[u8]) -> Self {
        Self::new(
            serde_json::json!({"worker_name": worker, "version": version}),
            Some(code),
        )
    }

    fn delete(worker: &str) -> Self {
        Self::new(
            serde_json::json!({"worker_name": worker, "action": "delete"}),
            None,
        )
    }

    async fn send(&self, http: SocketAddr) -> (u16, serde_json::Value) {
        let response = common::http_client()
            .post(format!("http://{http}/internal/broadcast"))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={}", self.boundary),
            )
            .header("x-workerpush-timestamp", self.timestamp.to_string())
            .header("x-workerpush-signature", &self.signature)
            .body(self.body.clone())
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }
}

/// Sends the request that removed `once` and the one that put its version 1 again, to `http`:
/// both refused as replays, and `once` stays at version 2, revision `v2`.
async fn replays_are_refused(
    http: SocketAddr,
    requests: [&SignedRequest; 2],
    v2: u64,
    hook_secret: &str,
) {
    for request in requests {
        let (status, body) = request.send(http).await;
        assert_eq!(status, 401, "a replay to {http} was accepted: {body}");
        assert!(body["error"].as_str().unwrap().contains("replay"), "{body}");
    }
    let (status, body) = common::hook_put(http, hook_secret, "once", "2", b"once v2").await;
    assert_eq!(
        (status, body["created"].as_bool(), body["revision"].as_u64()),
        (200, Some(false), Some(v2)),
        "nothing applied: version 2 is still the latest, unchanged: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_hook_request_is_applied_once_across_cores_and_restarts() {
    let mut cluster = Cluster::start(REDIS, 2);
    let put_v1 = SignedRequest::put("once", "1", b"once v1");
    let delete = SignedRequest::delete("once");
    assert_eq!(put_v1.send(cluster.http(0)).await.0, 201);
    assert_eq!(delete.send(cluster.http(0)).await.0, 200);
    let (status, body) =
        common::hook_put(cluster.http(0), HOOK_SECRET, "once", "2", b"once v2").await;
    assert_eq!(status, 201, "{body}");
    let v2 = body["revision"].as_u64().unwrap();

    // Replayed to the other core: a replayed delete would remove version 2, a replayed put
    // would bring version 1 back.
    replays_are_refused(cluster.http(1), [&delete, &put_v1], v2, HOOK_SECRET).await;
    // And to the same core after a restart (its in-memory guard is gone).
    cluster.cores[0].kill9();
    let dir = cluster._dirs[1].path().to_path_buf();
    cluster.cores[0] = start_core(&dir, REDIS, &cluster.prefix.name);
    replays_are_refused(cluster.http(0), [&delete, &put_v1], v2, HOOK_SECRET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_hook_request_is_applied_once_by_the_embedded_store_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let sign = |request: SignedRequest| {
        let signature =
            workerpush::http::signing::sign(secret.as_bytes(), request.timestamp, &request.body);
        SignedRequest {
            signature,
            ..request
        }
    };
    let put_v1 = sign(SignedRequest::put("once", "1", b"once v1"));
    let delete = sign(SignedRequest::delete("once"));
    assert_eq!(put_v1.send(server.addr("http")).await.0, 201);
    assert_eq!(delete.send(server.addr("http")).await.0, 200);
    let (status, body) =
        common::hook_put(server.addr("http"), &secret, "once", "2", b"once v2").await;
    assert_eq!(status, 201, "{body}");
    let v2 = body["revision"].as_u64().unwrap();
    server.kill9();
    let server = server.restart_same_ports();
    replays_are_refused(server.addr("http"), [&delete, &put_v1], v2, &secret).await;
}

impl PrivateRedis {
    /// Stops it and throws its data away: the next `restart` comes back empty.
    fn wipe(&mut self) {
        self.kill();
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(path).unwrap();
            } else {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
}

/// A real `workerpush watch` keeping every worker under `out`.
struct Watch {
    child: std::process::Child,
    out: PathBuf,
}

impl Watch {
    fn start(certs: &Path, grpc: SocketAddr, out: PathBuf) -> Self {
        let child = std::process::Command::new(BIN)
            .args(["watch", "--transport", "grpc", "--addr"])
            .arg(format!("localhost:{}", grpc.port()))
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("clients/consumer-1.pem"))
            .arg("--key")
            .arg(certs.join("clients/consumer-1-key.pem"))
            .arg("--out")
            .arg(&out)
            .env_clear()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, out }
    }

    /// Worker → the inode of its file: a rewrite (temp file + rename) changes it.
    fn inodes(&self) -> BTreeMap<String, u64> {
        use std::os::unix::fs::MetadataExt;
        self.held()
            .into_iter()
            .filter_map(|(worker, (version, _))| {
                let path = self.out.join(&worker).join(version).join("worker.js");
                std::fs::metadata(path).ok().map(|m| (worker, m.ino()))
            })
            .collect()
    }

    /// Worker → (version, SHA-256 of its file), as on disk now.
    fn held(&self) -> BTreeMap<String, (String, String)> {
        let mut held = BTreeMap::new();
        let Ok(workers) = std::fs::read_dir(&self.out) else {
            return held;
        };
        for worker in workers.flatten().filter(|e| e.path().is_dir()) {
            for version in std::fs::read_dir(worker.path()).unwrap().flatten() {
                if let Ok(code) = std::fs::read(version.path().join("worker.js")) {
                    held.insert(
                        worker.file_name().to_string_lossy().into_owned(),
                        (
                            version.file_name().to_string_lossy().into_owned(),
                            common::sha256(&code),
                        ),
                    );
                }
            }
        }
        held
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the cores' `/metrics` say of re-seeds, summed.
async fn reseeds(cluster: &Cluster) -> u64 {
    let mut total = 0;
    for core in 0..cluster.cores.len() {
        let text = common::metrics_text(cluster.http(core)).await;
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("workerpush_store_reseeds_total "))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap());
    }
    total
}

/// Worker names `/v1/workers` on `core` lists.
async fn listed(cluster: &Cluster, core: usize) -> BTreeSet<String> {
    let (status, body) =
        common::admin_get(cluster.http(core), Some(UPLOAD_TOKEN), "/v1/workers").await;
    if status != 200 {
        return BTreeSet::new();
    }
    let workers = body["workers"]
        .as_array()
        .or(body.as_array())
        .cloned()
        .unwrap_or_default();
    workers
        .iter()
        .filter_map(|w| w["name"].as_str().map(str::to_owned))
        .collect()
}

/// A put through `core`, retried (newly signed) while the cores find their way back to Redis.
async fn put_until_accepted(hook: &Hook, http: SocketAddr, worker: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = hook
            .put(http, worker, "1", code(worker, "1").as_bytes())
            .await;
        match answer {
            Ok((status, _)) if status == 200 || status == 201 => return status,
            other => assert!(
                Instant::now() < deadline,
                "{worker} never accepted: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_is_reseeded_once_and_the_edge_keeps_every_worker() {
    let mut redis = PrivateRedis::start().await;
    let cluster = Cluster::start(&redis.url(), 2);
    let hook = Hook::new();
    let out = cluster._dirs[0].path().join("edge");
    let watch = Watch::start(&cluster.certs, cluster.grpc(1), out);
    let mut expected = BTreeMap::new();
    for i in 1..=5 {
        let worker = format!("w{i}");
        hook.committed(cluster.http(0), &worker, "1").await;
        expected.insert(
            worker.clone(),
            (
                "1".to_owned(),
                common::sha256(code(&worker, "1").as_bytes()),
            ),
        );
    }
    until(
        Duration::from_secs(20),
        "the watch holding 5 workers",
        || watch.held() == expected,
    )
    .await;

    let files = watch.inodes();
    // The same data loss twice: FLUSHALL, then a restart without the data.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut connection)
        .await
        .unwrap();
    for (loss, worker) in [(1, "w6"), (2, "w7")] {
        if loss == 2 {
            redis.wipe();
            redis.restart().await;
        }
        assert_eq!(
            put_until_accepted(&hook, cluster.http(0), worker).await,
            201
        );
        expected.insert(
            worker.to_owned(),
            ("1".to_owned(), common::sha256(code(worker, "1").as_bytes())),
        );
        let names: BTreeSet<String> = expected.keys().cloned().collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let held = watch.held();
            // Never less than before: nothing the edge held is deleted on the way.
            assert!(
                expected
                    .iter()
                    .filter(|(w, _)| w.as_str() != worker)
                    .all(|(w, v)| held.get(w) == Some(v)),
                "loss {loss}: the watch lost code: {held:?}"
            );
            if held == expected
                && listed(&cluster, 0).await == names
                && listed(&cluster, 1).await == names
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "loss {loss}: held {held:?}, listed {:?} / {:?}",
                listed(&cluster, 0).await,
                listed(&cluster, 1).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let inodes = watch.inodes();
        assert!(
            files.iter().all(|(w, inode)| inodes.get(w) == Some(inode)),
            "loss {loss}: the watch rewrote code it held: {files:?} then {inodes:?}"
        );
        assert_eq!(
            reseeds(&cluster).await,
            loss,
            "one re-seed per loss, by one core"
        );
        let (head, state) = store_state(&cluster.prefix.store()).await;
        assert_eq!(
            state.len(),
            names.len(),
            "redis holds every worker again: {state:?}"
        );
        assert_eq!(
            head,
            names.len() as u64,
            "a new epoch: the seed, then the upload"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One fleet: propagation seen from any core.
// ---------------------------------------------------------------------------------------------

/// The core id a core names its own consumers with, read from its `/v1/consumers`.
async fn own_core_id(http: SocketAddr, consumer: &str) -> String {
    let (_, body) = common::admin_get(http, Some(UPLOAD_TOKEN), "/v1/consumers").await;
    body["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer_id"] == consumer)
        .unwrap_or_else(|| panic!("{consumer} not on this core: {body}"))["core"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Two cores on a private Redis, and `consumer-1/edge-b` following `app` on the second; the
/// second core's id.
async fn two_cores_and_an_edge_on_the_second()
-> (PrivateRedis, Cluster, common::HandConsumer, String) {
    let redis = PrivateRedis::start().await;
    let cluster = Cluster::start(&redis.url(), 2);
    let edge = common::HandConsumer::subscribe(
        &cluster.certs,
        cluster.grpc(1),
        "consumer-1/edge-b",
        &["app"],
        None,
    )
    .await;
    let core_b = own_core_id(cluster.http(1), "consumer-1/edge-b").await;
    (redis, cluster, edge, core_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_through_one_core_answers_with_the_acks_and_refusals_of_another_cores_consumers() {
    let (_redis, cluster, mut edge, core_b) = two_cores_and_an_edge_on_the_second().await;
    let a = cluster.http(0);

    // `/v1/consumers` on A lists B's consumer, naming B.
    let (status, consumers) = common::admin_get(a, Some(UPLOAD_TOKEN), "/v1/consumers").await;
    assert_eq!(status, 200, "{consumers}");
    let listed: Vec<_> = consumers["consumers"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1, "{consumers}");
    assert_eq!(listed[0]["consumer_id"], "consumer-1/edge-b");
    assert_eq!(listed[0]["core"], core_b.as_str());
    assert_eq!(listed[0]["connected"], true);

    for (version, verdict) in [("1", None), ("2", Some("disk full"))] {
        let upload = tokio::spawn(async move {
            let answer = common::hook_put_query(
                a,
                HOOK_SECRET,
                "?wait=5s",
                "app",
                version,
                code("app", version).as_bytes(),
            )
            .await;
            (answer, Instant::now())
        });
        let put = edge.next_change().await;
        assert_eq!(put.version, version);
        let acked = Instant::now();
        edge.ack(&put, verdict).await;
        let ((status, answer), answered) = upload.await.unwrap();
        assert_eq!(status, 201, "{answer}");
        let after_ack = answered.duration_since(acked);
        println!("version {version}: answered {after_ack:?} after the ack on the other core");
        assert!(
            after_ack < Duration::from_millis(500),
            "the wait answered {after_ack:?} after the last ack: a wake-up, not a poll"
        );
        let propagation = &answer["propagation"];
        assert_eq!(propagation["subscribers"], 1, "{answer}");
        assert_eq!(propagation["pending"], serde_json::json!([]), "{answer}");
        match verdict {
            None => {
                assert_eq!(propagation["state"], "complete", "{answer}");
                assert_eq!(propagation["acked"][0]["consumer_id"], "consumer-1/edge-b");
                assert_eq!(propagation["acked"][0]["core"], core_b.as_str());
            }
            Some(reason) => {
                assert_eq!(propagation["state"], "failed", "{answer}");
                assert_eq!(propagation["failed"][0]["consumer_id"], "consumer-1/edge-b");
                assert_eq!(propagation["failed"][0]["reason"], reason);
                assert_eq!(propagation["failed"][0]["core"], core_b.as_str());
            }
        }
    }

    // The admin views of A agree: the worker's detail and the listing's counts.
    let (_, worker) = common::admin_get(a, Some(UPLOAD_TOKEN), "/v1/workers/app").await;
    assert_eq!(worker["propagation"]["state"], "failed", "{worker}");
    assert_eq!(worker["propagation"]["failed"][0]["reason"], "disk full");
    let (_, workers) = common::admin_get(a, Some(UPLOAD_TOKEN), "/v1/workers").await;
    let summary = &workers["workers"][0]["propagation"];
    assert_eq!(
        (
            &summary["subscribers"],
            &summary["failed"],
            &summary["state"]
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!("failed")
        ),
        "{workers}"
    );

    // A consumer subscribed only on B that has not answered keeps a wait on A pending.
    let (status, answer) = common::hook_put_query(
        a,
        HOOK_SECRET,
        "?wait=300ms",
        "app",
        "3",
        code("app", "3").as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["propagation"]["state"], "pending", "{answer}");
    assert_eq!(answer["propagation"]["pending"][0]["core"], core_b.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_a_core_killed_with_kill_9_count_as_pending_on_the_others() {
    let (_redis, mut cluster, mut edge, core_b) = two_cores_and_an_edge_on_the_second().await;
    let a = cluster.http(0);
    let upload = tokio::spawn(async move {
        common::hook_put_query(a, HOOK_SECRET, "?wait=5s", "app", "1", b"v1").await
    });
    let put = edge.next_change().await;
    edge.ack(&put, None).await;
    let (_, answer) = upload.await.unwrap();
    assert_eq!(answer["propagation"]["state"], "complete", "{answer}");

    cluster.cores[1].kill9();
    let (status, answer) =
        common::hook_put_query(a, HOOK_SECRET, "?wait=500ms", "app", "2", b"v2").await;
    assert_eq!(status, 201, "{answer}");
    let propagation = &answer["propagation"];
    assert_eq!(propagation["state"], "pending", "{answer}");
    assert_eq!(propagation["subscribers"], 1, "{answer}");
    assert_eq!(
        propagation["unlisted"][0]["core"],
        core_b.as_str(),
        "{answer}"
    );
    assert_eq!(
        propagation["unlisted"][0]["summary"]["pending"], 1,
        "{answer}"
    );
    let (_, workers) = common::admin_get(a, Some(UPLOAD_TOKEN), "/v1/workers").await;
    assert_eq!(
        workers["workers"][0]["propagation"]["pending"], 1,
        "{workers}"
    );

    // It resumes on A: once B is taken for dead, B no longer counts it, and A's wait completes
    // with its ack alone.
    let epoch = answer["epoch"].as_str().unwrap().to_owned();
    let mut resumed = common::HandConsumer::subscribe(
        &cluster.certs,
        cluster.grpc(0),
        "consumer-1/edge-b",
        &["app"],
        Some((&epoch, put.revision)),
    )
    .await;
    let started = Instant::now();
    let upload = tokio::spawn(async move {
        common::hook_put_query(a, HOOK_SECRET, "?wait=15s", "app", "3", b"v3").await
    });
    let v3 = loop {
        let update = resumed.next_change().await;
        if update.version == "3" {
            break update;
        }
        resumed.ack(&update, None).await;
    };
    resumed.ack(&v3, None).await;
    let (_, answer) = upload.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered once B was taken for dead (5 s), not at the wait's deadline: {:?}",
        started.elapsed()
    );
    let propagation = &answer["propagation"];
    assert_eq!(propagation["state"], "complete", "{answer}");
    assert_eq!(propagation["subscribers"], 1, "{answer}");
    let core_a = own_core_id(a, "consumer-1/edge-b").await;
    assert_eq!(propagation["acked"][0]["core"], core_a.as_str(), "{answer}");
}
