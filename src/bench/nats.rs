//! `--baseline nats`: the same fan-out through a local `nats-server` with TLS, so that every
//! figure of a run has a baseline measured on the same machine at the same time.
//!
//! The server is started on a free loopback port with the dev PKI of the TLS module written
//! to a temp dir (client certificates required, as workerpush requires them), and its memory
//! and CPU time are read from `/proc` like a spawned core's. Each subscriber is its own
//! `async-nats` client on its own TLS connection (ring-only rustls, trusting only the dev CA,
//! presenting the dev client certificate). A change is one message on the run's subject: its publish sequence, its
//! index, the SHA-256 of its code, the code (the same bytes the hook publisher sends). Every
//! subscriber verifies the checksum and counts losses, duplicates and reordering as the
//! workerpush fleet does; latency is from just before the publish to the verified message, on
//! the same clock ([`ledger::unix_ns`]).
//!
//! Pace: open loop publishes on the same schedule; closed loop keeps `in_flight` publishers,
//! each publishing and then flushing its connection (written to the server: core NATS has no
//! acknowledgement, so this is the nearest thing to an answered hook request).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{Client, ConnectOptions, Event};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::{
    process::{Child, Command},
    sync::{Mutex, Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    BenchError, Counts, Plan, Report, Samples, finish,
    host::ProcessSample,
    ledger::{Ledger, unix_ns},
    per_subscriber,
    publish::{Waited, code, filler, pace_all},
    target::terminate,
};
use crate::tls::{
    self,
    pki::{CA_CERT, DEV_CLIENT, SERVER_CERT, SERVER_KEY, client_paths},
};

/// How long the server may take to write its ports file.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Bytes before the code in every message: publish sequence, index (both u64 little-endian),
/// checksum (64 hex digits).
const HEADER: usize = 8 + 8 + 64;

/// A `nats-server` process on a free loopback port in a temp dir. Killed (and the dir
/// removed) when dropped.
pub struct NatsServer {
    child: Child,
    pid: u32,
    dir: PathBuf,
    /// `tls://127.0.0.1:<port>`.
    url: String,
    /// The dev PKI's CA, client certificate and key.
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl NatsServer {
    /// Starts `bin` with TLS (client certificates required), payloads up to `size` bytes of
    /// code, and waits until it listens.
    pub async fn start(bin: &Path, size: usize) -> Result<Self, BenchError> {
        let dir = std::env::temp_dir().join(format!(
            "workerpush-bench-nats-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let started = Self::launch(bin, size, dir.clone()).await;
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    }

    async fn launch(bin: &Path, size: usize, dir: PathBuf) -> Result<Self, BenchError> {
        let fail = |what: String| BenchError::Spawn(format!("nats-server: {what}"));
        let certs = dir.join("certs");
        tls::pki::ensure_dev(&certs, DEV_CLIENT).map_err(|e| fail(e.to_string()))?;
        let [cert, key] = client_paths(&certs, DEV_CLIENT);
        let ports = dir.join("ports");
        std::fs::create_dir_all(&ports).map_err(|e| fail(format!("{}: {e}", ports.display())))?;
        // Room for the header and the protocol line; the server's own limit is 64 MiB.
        let max_payload = (size + HEADER + 1024).max(1 << 20);
        let quoted = |path: &Path| serde_json::to_string(&path.display().to_string());
        let config = format!(
            "host: 127.0.0.1\nport: -1\nports_file_dir: {}\nmax_payload: {max_payload}\n\
             max_pending: {}\nwrite_deadline: \"30s\"\n\
             tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: true\n  timeout: 10\n}}\n",
            quoted(&ports).map_err(|e| fail(e.to_string()))?,
            (max_payload * 64).max(64 << 20),
            quoted(&certs.join(SERVER_CERT)).map_err(|e| fail(e.to_string()))?,
            quoted(&certs.join(SERVER_KEY)).map_err(|e| fail(e.to_string()))?,
            quoted(&certs.join(CA_CERT)).map_err(|e| fail(e.to_string()))?,
        );
        let config_file = dir.join("nats.conf");
        std::fs::write(&config_file, config)
            .map_err(|e| fail(format!("{}: {e}", config_file.display())))?;
        let log = dir.join("nats-server.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| fail(format!("{}: {e}", log.display())))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot start {} ({e}): install it (apt-get install nats-server) or name it \
                     with --nats-server",
                    bin.display()
                ))
            })?;
        let pid = child
            .id()
            .ok_or_else(|| fail("exited at once".to_owned()))?;
        let mut server = Self {
            child,
            pid,
            url: String::new(),
            ca: certs.join(CA_CERT),
            cert,
            key,
            dir,
        };
        let port = server.port(&ports).await?;
        server.url = format!("tls://127.0.0.1:{port}");
        Ok(server)
    }

    /// Waits for the ports file the server writes once it listens, and reads its client port.
    async fn port(&mut self, ports: &Path) -> Result<u16, BenchError> {
        let file = ports.join(format!("nats-server_{}.ports", self.pid));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Some(port) = client_port(&text)
            {
                return Ok(port);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.join("nats-server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(BenchError::Spawn(format!(
                    "nats-server exited before listening ({status}): {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Spawn(format!(
                    "nats-server wrote no {} within {}s",
                    file.display(),
                    READY_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub async fn stop(mut self) {
        terminate(&mut self.child, self.pid, "nats-server").await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The port of the first client URL of a ports file (`{"nats":["nats://127.0.0.1:4222"],…}`).
fn client_port(text: &str) -> Option<u16> {
    let ports: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = ports.get("nats")?.as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

/// One subscriber's account.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    received: u32,
    duplicates: u32,
    verify_failures: u32,
}

/// What every subscriber shares.
struct Shared {
    ledger: Arc<Ledger>,
    subject: String,
    size: usize,
    /// One permit per subscriber holding every change.
    complete: Semaphore,
    stop: CancellationToken,
}

impl Tally {
    /// One message of the run's subject, received at `arrived_ns`.
    fn take(
        &mut self,
        payload: &[u8],
        arrived_ns: u64,
        seen: &mut [bool],
        last_seq: &mut u64,
        shared: &Shared,
    ) {
        let Some((head, body)) = payload.split_at_checked(HEADER) else {
            self.verify_failures += 1;
            return;
        };
        let word = |range: std::ops::Range<usize>| {
            head.get(range)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(u64::MAX, u64::from_le_bytes)
        };
        let (seq, index) = (word(0..8), word(8..16));
        let Some(slot) = usize::try_from(index).ok().and_then(|i| seen.get_mut(i)) else {
            self.verify_failures += 1;
            return;
        };
        if *slot || seq <= *last_seq {
            self.duplicates += 1;
            *slot = true;
            return;
        }
        let checksum = std::str::from_utf8(&head[16..]).unwrap_or("");
        let size = i64::try_from(shared.size).unwrap_or(i64::MAX);
        if let Err(error) = crate::client::verify(body, checksum, size) {
            tracing::warn!(%error, index, "NATS baseline message did not verify");
            self.verify_failures += 1;
            return;
        }
        *slot = true;
        *last_seq = seq;
        self.received += 1;
        if let Some(ns) = usize::try_from(index)
            .ok()
            .and_then(|i| shared.ledger.record(i, arrived_ns))
        {
            self.latencies_us
                .push(u32::try_from(ns / 1_000).unwrap_or(u32::MAX));
        }
        if self.received as usize == shared.ledger.changes() {
            shared.complete.add_permits(1);
        }
    }
}

/// Connects subscriber `i`, tells `synced` once the server holds its subscription, and counts
/// what arrives until told to stop.
async fn subscriber(
    i: usize,
    options: ConnectOptions,
    url: String,
    slots: Arc<Semaphore>,
    synced: mpsc::Sender<Result<(), String>>,
    shared: Arc<Shared>,
) -> Tally {
    let mut tally = Tally::default();
    let setup = async {
        let _slot = slots.acquire().await.map_err(|e| e.to_string())?;
        let client = options
            .connect(&url)
            .await
            .map_err(|e| format!("subscriber {i}: connect {url}: {e}"))?;
        let messages = client
            .subscribe(shared.subject.clone())
            .await
            .map_err(|e| format!("subscriber {i}: subscribe: {e}"))?;
        // The server handles a connection's operations in order: once its own message on a
        // subject of its own comes back, the subscription above is in place.
        let sync_subject = format!("{}.sync.{i}", shared.subject);
        let mut sync = client
            .subscribe(sync_subject.clone())
            .await
            .map_err(|e| format!("subscriber {i}: subscribe: {e}"))?;
        client
            .publish(sync_subject, Bytes::new())
            .await
            .map_err(|e| format!("subscriber {i}: publish: {e}"))?;
        sync.next()
            .await
            .ok_or_else(|| format!("subscriber {i}: connection closed before it synced"))?;
        Ok::<_, String>((client, messages))
    };
    let (_client, mut messages) = match setup.await {
        Ok(ready) => ready,
        Err(error) => {
            let _ = synced.send(Err(error)).await;
            return tally;
        }
    };
    let _ = synced.send(Ok(())).await;
    drop(synced);
    let mut seen = vec![false; shared.ledger.changes()];
    let mut last_seq = 0;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { break };
                tally.take(&message.payload, unix_ns(), &mut seen, &mut last_seq, &shared);
            }
            () = shared.stop.cancelled() => break,
        }
    }
    tally
}

/// The publisher: one connection; a lock around the publish makes the sequence in a message
/// its order on the wire.
struct NatsPublisher {
    client: Client,
    subject: String,
    filler: Bytes,
    ledger: Arc<Ledger>,
    seq: Mutex<u64>,
}

impl NatsPublisher {
    async fn publish(&self, index: usize) -> Result<Waited, String> {
        let version = self.ledger.version(index);
        let code = code(&self.filler, &version);
        let mut message = BytesMut::with_capacity(HEADER + code.len());
        message.extend_from_slice(&[0; 8]);
        message.extend_from_slice(&u64::try_from(index).unwrap_or(u64::MAX).to_le_bytes());
        message.extend_from_slice(hex::encode(Sha256::digest(&code)).as_bytes());
        message.extend_from_slice(&code);
        {
            let mut seq = self.seq.lock().await;
            *seq += 1;
            message[..8].copy_from_slice(&seq.to_le_bytes());
            self.ledger.mark_sent(index);
            self.client
                .publish(self.subject.clone(), message.freeze())
                .await
                .map_err(|e| format!("{version}: publish: {e}"))?;
        }
        self.client
            .flush()
            .await
            .map_err(|e| format!("{version}: flush: {e}"))?;
        Ok(None)
    }
}

/// Runs the plan's fan-out through a `nats-server` it starts, and answers its report.
pub async fn measure(plan: &Plan, open_file_limit: u64) -> Result<Report, BenchError> {
    let server = NatsServer::start(&plan.nats_server, plan.size).await?;
    let result = fan_out(plan, &server, open_file_limit).await;
    server.stop().await;
    result
}

async fn fan_out(
    plan: &Plan,
    server: &NatsServer,
    open_file_limit: u64,
) -> Result<Report, BenchError> {
    let sample = || -> Samples {
        (
            ProcessSample::of(server.pid).ok(),
            ProcessSample::own().ok(),
        )
    };
    // Connections lost (the client reconnects by itself; what it missed meanwhile is lost).
    let disconnects = Arc::new(AtomicU64::new(0));
    let options = || {
        let disconnects = disconnects.clone();
        ConnectOptions::new()
            .event_callback(move |event| {
                let disconnects = disconnects.clone();
                async move {
                    if matches!(event, Event::Disconnected) {
                        disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            // The dev PKI's files rather than `tls_client_config`: given a whole rustls
            // configuration, async-nats 0.51 still loads (and drops) the system's root
            // certificates on every connect, blocking a runtime thread for tens of ms each.
            // So configured it builds a ring-only rustls configuration (TLS 1.2 and 1.3, the
            // process's ring provider) trusting only the dev CA.
            .require_tls(true)
            .add_root_certificates(server.ca.clone())
            .add_client_certificate(server.cert.clone(), server.key.clone())
            .subscription_capacity(plan.changes.max(1024) + 16)
            .connection_timeout(Duration::from_secs(30))
    };
    let ledger = Arc::new(Ledger::new(plan.changes, plan.workers));
    let shared = Arc::new(Shared {
        ledger: ledger.clone(),
        subject: format!("workerpush.bench.{:08x}", rand::random::<u32>()),
        size: plan.size,
        complete: Semaphore::new(0),
        stop: CancellationToken::new(),
    });
    let mut report = plan.report(open_file_limit);
    report.transport = "nats-tls";
    report.measures = "publish -> verified message at the subscriber";

    let before = sample();
    let connecting = Instant::now();
    let slots = Arc::new(Semaphore::new(plan.connect_concurrency));
    let (synced_tx, mut synced) = mpsc::channel(plan.subscribers.min(4096));
    let mut fleet = JoinSet::new();
    for i in 0..plan.subscribers {
        fleet.spawn(subscriber(
            i,
            options(),
            server.url.clone(),
            slots.clone(),
            synced_tx.clone(),
            shared.clone(),
        ));
    }
    drop(synced_tx);
    let deadline = tokio::time::Instant::from_std(connecting + plan.connect_timeout());
    let mut ready = 0;
    while ready < plan.subscribers {
        let error = match tokio::time::timeout_at(deadline, synced.recv()).await {
            Ok(Some(Ok(()))) => {
                ready += 1;
                continue;
            }
            Ok(Some(Err(error))) => error,
            Ok(None) => "every subscriber task ended".to_owned(),
            Err(_) => format!(
                "{ready} of {} subscribers synced within {}s",
                plan.subscribers,
                plan.connect_timeout().as_secs()
            ),
        };
        shared.stop.cancel();
        fleet.shutdown().await;
        return Err(BenchError::Subscribers(format!("NATS baseline: {error}")));
    }
    report.connect_secs = connecting.elapsed().as_secs_f64();
    let idle = sample();
    report.rss_per_idle_subscriber_kib = per_subscriber(before.0, idle.0, plan.subscribers);
    report.bench_rss_per_subscriber_kib = per_subscriber(before.1, idle.1, plan.subscribers);
    report.core_rss_kib = idle.0.map(|s| s.rss_kib);

    let client = options()
        .connect(&server.url)
        .await
        .map_err(|e| BenchError::Publish(format!("NATS baseline: connect: {e}")))?;
    let publisher = Arc::new(NatsPublisher {
        client,
        subject: shared.subject.clone(),
        filler: filler(plan.size),
        ledger: ledger.clone(),
        seq: Mutex::new(0),
    });
    let start = sample();
    let publishing = unix_ns();
    let published = pace_all(plan.changes, plan.pace, move |index| {
        let publisher = publisher.clone();
        async move { publisher.publish(index).await }
    })
    .await;
    report.publish_secs = published.elapsed.as_secs_f64();
    if let Err(error) = published.check() {
        shared.stop.cancel();
        fleet.shutdown().await;
        return Err(error);
    }
    let waiting = u32::try_from(plan.subscribers).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(plan.deadline, shared.complete.acquire_many(waiting)).await;
    let end = sample();
    shared.stop.cancel();
    let mut tallies = Vec::with_capacity(plan.subscribers);
    while let Some(joined) = fleet.join_next().await {
        if let Ok(tally) = joined {
            tallies.push(tally);
        }
    }
    let sum = |f: fn(&Tally) -> u32| tallies.iter().map(|t| u64::from(f(t))).sum::<u64>();
    let counts = Counts {
        received: sum(|t| t.received),
        duplicates: sum(|t| t.duplicates),
        verify_failures: sum(|t| t.verify_failures),
        resets: 0,
        reconnects: disconnects.load(Ordering::Relaxed),
    };
    let mut latencies_us: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().map(|&us| u64::from(us)))
        .collect();
    super::all_held(&mut report, &ledger);
    finish(
        &mut report,
        counts,
        &mut latencies_us,
        ledger.last_delivery_ns().saturating_sub(publishing),
        start,
        end,
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::publish::MIN_SIZE;

    fn message(seq: u64, index: u64, code: &[u8], checksum_of: &[u8]) -> Vec<u8> {
        let mut message = seq.to_le_bytes().to_vec();
        message.extend_from_slice(&index.to_le_bytes());
        message.extend_from_slice(hex::encode(Sha256::digest(checksum_of)).as_bytes());
        message.extend_from_slice(code);
        message
    }

    #[test]
    fn messages_are_counted_like_the_fleet_counts_updates() {
        let ledger = Arc::new(Ledger::new(3, 1));
        (0..3).for_each(|i| ledger.mark_sent(i));
        let shared = Shared {
            ledger: ledger.clone(),
            subject: "s".to_owned(),
            size: MIN_SIZE,
            complete: Semaphore::new(0),
            stop: CancellationToken::new(),
        };
        let filler = filler(MIN_SIZE);
        let code = |i: usize| code(&filler, &ledger.version(i));
        let (mut tally, mut seen, mut last_seq) = (Tally::default(), vec![false; 3], 0);
        let mut take = |payload: Vec<u8>, tally: &mut Tally| {
            tally.take(&payload, unix_ns(), &mut seen, &mut last_seq, &shared);
        };
        take(message(1, 0, &code(0), &code(0)), &mut tally);
        take(message(1, 0, &code(0), &code(0)), &mut tally); // again
        take(message(3, 2, &code(2), &code(2)), &mut tally);
        take(message(4, 1, &code(1), &code(0)), &mut tally); // wrong checksum
        take(message(2, 1, &code(1), &code(1)), &mut tally); // behind seq 3
        take(message(5, 9, &code(1), &code(1)), &mut tally); // not a change of the run
        take(b"short".to_vec(), &mut tally);
        assert_eq!(
            (tally.received, tally.duplicates, tally.verify_failures),
            (2, 2, 3)
        );
        assert_eq!(tally.latencies_us.len(), 2);
        assert_eq!(
            shared.complete.available_permits(),
            0,
            "change 1 never held"
        );
    }

    #[test]
    fn the_client_port_is_read_from_the_ports_file() {
        let text = r#"{"nats":["nats://127.0.0.1:41234"],"monitoring":null}"#;
        assert_eq!(client_port(text), Some(41234));
        assert_eq!(client_port(r#"{"nats":[]}"#), None);
        assert_eq!(client_port("not json"), None);
    }
}
