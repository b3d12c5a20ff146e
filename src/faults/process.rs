//! Real processes to hurt: the `workerpush` binary (`serve --dev` on port 0 in a scratch
//! directory, learning its addresses from what it prints, ready when it says so) and a private
//! `redis-server` (append-only, fsync on every write). Both can be killed with SIGKILL and
//! started again on the same ports and the same data.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
    time::Instant,
};

use super::FaultError;

/// How long a process may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A directory under the system's temp dir, removed when dropped (kept with `FAULT_KEEP=1`).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes a new, empty directory named after `label`.
    pub fn new(label: &str) -> Result<Self, FaultError> {
        let path = std::env::temp_dir().join(format!(
            "workerpush-faults-{label}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("FAULT_KEEP").is_some() {
            eprintln!("faults: kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The addresses a core bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreAddrs {
    /// gRPC (TCP).
    pub grpc: SocketAddr,
    /// QUIC (UDP).
    pub quic: SocketAddr,
    /// Hook and admin HTTP.
    pub http: SocketAddr,
}

/// A `workerpush serve --dev` process; killed when dropped.
#[derive(Debug)]
pub struct CoreProcess {
    bin: PathBuf,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    addrs: CoreAddrs,
    starts: u32,
}

impl CoreProcess {
    /// Starts `bin serve --dev` on 127.0.0.1, every port 0, data and certificates under `dir`,
    /// with `extra` arguments; returns once it printed `workerpush: ready`.
    pub async fn start(bin: &Path, dir: &Path, extra: &[String]) -> Result<Self, FaultError> {
        let ports = CoreAddrs {
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            quic: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let (child, addrs) = spawn_core(bin, dir, extra, ports).await?;
        Ok(Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            extra: extra.to_vec(),
            child: Some(child),
            addrs,
            starts: 1,
        })
    }

    /// Where it listens.
    pub fn addrs(&self) -> CoreAddrs {
        self.addrs
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// `certs/` (the dev CA, the server and client `consumer-1` certificates).
    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// `HOOK_SECRET` from `certs/dev-secrets.env`.
    pub fn hook_secret(&self) -> Result<String, FaultError> {
        let text = std::fs::read_to_string(self.certs().join(crate::app::DEV_SECRETS))?;
        text.lines()
            .find_map(|line| line.strip_prefix("HOOK_SECRET="))
            .map(str::to_owned)
            .ok_or_else(|| FaultError::Setup("no HOOK_SECRET in dev-secrets.env".to_owned()))
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again with the same arguments, data and ports (after [`Self::kill9`]).
    pub async fn restart(&mut self) -> Result<(), FaultError> {
        self.kill9().await;
        let (child, addrs) = spawn_core(&self.bin, &self.dir, &self.extra, self.addrs).await?;
        if addrs != self.addrs {
            return Err(FaultError::Setup(format!(
                "restarted on {addrs:?} instead of {:?}",
                self.addrs
            )));
        }
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }
}

async fn spawn_core(
    bin: &Path,
    dir: &Path,
    extra: &[String],
    ports: CoreAddrs,
) -> Result<(Child, CoreAddrs), FaultError> {
    let mut args: Vec<String> = [
        "serve",
        "--dev",
        "--bind",
        "127.0.0.1",
        "--upload-port",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    for (flag, addr) in [
        ("--grpc-port", ports.grpc),
        ("--quic-port", ports.quic),
        ("--http-port", ports.http),
    ] {
        args.extend([flag.to_owned(), addr.port().to_string()]);
    }
    args.extend([
        "--data-dir".to_owned(),
        dir.join("data").display().to_string(),
        "--certs-dir".to_owned(),
        dir.join("certs").display().to_string(),
    ]);
    args.extend(extra.iter().cloned());
    let mut child = Command::new(bin)
        .args(&args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("FAULT_CORE_LOG").unwrap_or_else(|_| "error".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FaultError::Setup(format!("spawn {}: {e}", bin.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| FaultError::Setup("no stdout".to_owned()))?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut grpc, mut quic, mut http) = (None, None, None);
    let ready = async {
        while let Some(line) = lines.next_line().await? {
            let Some(rest) = line.strip_prefix("workerpush: ") else {
                continue;
            };
            if rest == "ready" {
                return Ok(true);
            }
            if let Some((name, tail)) = rest.split_once(" listening on ") {
                let addr = tail.split_whitespace().next().and_then(|a| a.parse().ok());
                match name {
                    "grpc" => grpc = addr,
                    "quic" => quic = addr,
                    "http" => http = addr,
                    _ => {}
                }
            }
        }
        Ok::<_, std::io::Error>(false)
    };
    let said_ready = tokio::time::timeout(READY_WITHIN, ready)
        .await
        .map_err(|_| FaultError::Setup(format!("{} not ready in time", bin.display())))??;
    let (Some(grpc), Some(quic), Some(http), true) = (grpc, quic, http, said_ready) else {
        let status = child.try_wait();
        return Err(FaultError::Setup(format!(
            "workerpush {args:?} exited or did not say where it listens ({status:?})"
        )));
    };
    // Keep reading stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, CoreAddrs { grpc, quic, http }))
}

/// A private `redis-server` on 127.0.0.1: append-only, fsync on every write, its files in a
/// directory of its own; killed when dropped.
#[derive(Debug)]
pub struct RedisProcess {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    starts: u32,
    /// `--replicaof 127.0.0.1 <port>` at the next (re)start.
    replica_of: Option<u16>,
}

impl RedisProcess {
    /// Starts `bin` (`redis-server`) on a free port with its files under `dir`.
    pub async fn start(bin: &Path, dir: &Path) -> Result<Self, FaultError> {
        Self::start_following(bin, dir, None).await
    }

    /// [`Self::start`], as a replica of `primary` (once it has synced with it).
    pub async fn start_replica(
        bin: &Path,
        dir: &Path,
        primary: &RedisProcess,
    ) -> Result<Self, FaultError> {
        let redis = Self::start_following(bin, dir, Some(primary.port)).await?;
        redis.wait_in_sync().await?;
        Ok(redis)
    }

    async fn start_following(
        bin: &Path,
        dir: &Path,
        replica_of: Option<u16>,
    ) -> Result<Self, FaultError> {
        // Free now; the tiny window until Redis binds it is acceptable for a test harness.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        std::fs::create_dir_all(dir)?;
        let mut redis = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            port,
            child: None,
            starts: 0,
            replica_of,
        };
        redis.restart().await?;
        Ok(redis)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Records that it was promoted (`REPLICAOF NO ONE`): a restart keeps it a primary.
    pub fn promoted(&mut self) {
        self.replica_of = None;
    }

    /// Makes it follow `primary` from its next restart.
    pub fn follow_at_restart(&mut self, primary: &RedisProcess) {
        self.replica_of = Some(primary.port);
    }

    /// Sends one command (`FLUSHALL`, `REPLICAOF NO ONE`, …) and returns its answer as text.
    pub async fn command(&self, args: &[&str]) -> Result<String, FaultError> {
        let fail = |e: redis::RedisError| FaultError::Setup(format!("redis {args:?}: {e}"));
        let client = redis::Client::open(self.url()).map_err(fail)?;
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(fail)?;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        let value: redis::Value = command.query_async(&mut connection).await.map_err(fail)?;
        Ok(match value {
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            redis::Value::SimpleString(text) => text,
            redis::Value::VerbatimString { text, .. } => text,
            other => format!("{other:?}"),
        })
    }

    /// Waits until this replica's link to its primary is up and synced.
    async fn wait_in_sync(&self) -> Result<(), FaultError> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let info = self.command(&["INFO", "replication"]).await?;
            if info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(FaultError::Setup(format!("replica never in sync: {info}")));
            }
            // Polling a condition: Redis says nothing when the link is up.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// (Re)starts it on its port and data; returns once it answers PING with PONG (after
    /// loading its append-only file).
    pub async fn restart(&mut self) -> Result<(), FaultError> {
        self.kill9().await;
        let child = Command::new(&self.bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &self.dir.display().to_string(),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                "redis.log",
            ])
            .args(
                self.replica_of
                    .map(|port| {
                        [
                            "--replicaof".to_owned(),
                            "127.0.0.1".to_owned(),
                            port.to_string(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FaultError::Setup(format!("spawn {}: {e}", self.bin.display())))?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + READY_WITHIN;
        while !self.pong().await {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(FaultError::Setup(format!(
                    "redis-server exited: {status}; see {}/redis.log",
                    self.dir.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(FaultError::Setup(
                    "redis-server not ready in time".to_owned(),
                ));
            }
            // Polling a condition: Redis says nothing when it is ready.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn pong(&self) -> bool {
        let ping = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.write_all(b"PING\r\n").await?;
            let mut reply = [0u8; 5];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(&reply == b"+PONG")
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(true))
        )
    }
}
