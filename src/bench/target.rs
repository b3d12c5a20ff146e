//! The deployment under test: either one the operator names (`--addr`, `--hook`, ...) or a
//! core this benchmark starts on this machine (`--spawn`) as a separate process, whose memory
//! and CPU time it can then read.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use rustls_pki_types::{CertificateDer, pem::PemObject};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdout, Command},
};

use super::BenchError;
use crate::{
    app::DEV_SECRETS,
    config::TransportKind,
    tls::{
        self, ClientTlsPurpose,
        pki::{DEV_CLIENT, client_paths},
    },
};

/// How long a spawned core may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where to connect and publish.
#[derive(Debug)]
pub struct Endpoints {
    /// The transport's `host:port`.
    pub addr: String,
    /// The hook's full URL.
    pub hook: reqwest::Url,
    /// The hook's signing secret.
    pub hook_secret: String,
    /// CA, client certificate and key of the subscribers.
    pub ca: PathBuf,
    /// See `ca`.
    pub cert: PathBuf,
    /// See `ca`.
    pub key: PathBuf,
}

impl Endpoints {
    /// The subscribers' TLS configuration for `purpose`.
    pub fn tls(&self, purpose: ClientTlsPurpose) -> Result<Arc<rustls::ClientConfig>, BenchError> {
        tls::client_config(&self.ca, &self.cert, &self.key, purpose)
            .map_err(|e| BenchError::Config(e.to_string()))
    }

    /// The identity of the subscribers' certificate: their consumer ids are
    /// `<identity>/bench-<i>`.
    pub fn identity(&self) -> Result<String, BenchError> {
        let leaf = CertificateDer::from_pem_file(&self.cert)
            .map_err(|e| BenchError::Config(format!("{}: {e}", self.cert.display())))?;
        tls::identity_of(&leaf).map_err(|e| BenchError::Config(e.to_string()))
    }
}

/// Completes a hook URL given as `http://host:port` with the hook's path.
pub fn hook_url(text: &str) -> Result<reqwest::Url, BenchError> {
    let mut url = reqwest::Url::parse(text)
        .map_err(|e| BenchError::Config(format!("--hook {text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(BenchError::Config(format!(
            "--hook {text:?}: expected an http:// or https:// URL"
        )));
    }
    if url.path() == "/" {
        url.set_path("/internal/broadcast");
    }
    Ok(url)
}

/// A `workerpush serve --dev` process on loopback ports in a temp dir. Killed (and the dir
/// removed) when dropped.
pub struct SpawnedCore {
    child: Child,
    pid: u32,
    dir: PathBuf,
    addrs: HashMap<String, SocketAddr>,
}

impl SpawnedCore {
    /// Starts this binary as a core sized for `subscribers` and `changes`, and waits until it
    /// says it is ready.
    pub async fn start(subscribers: usize, changes: usize) -> Result<Self, BenchError> {
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::Spawn(format!("cannot find this binary: {e}")))?;
        let dir = std::env::temp_dir().join(format!(
            "workerpush-bench-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::Spawn(format!("{}: {e}", dir.display())))?;
        // Every subscription holds a stream, and bundle fetches take more.
        let max_streams = (subscribers * 2 + 64).max(1000);
        // The storm resumes from the log: keep every change of the run in it.
        let retain = (changes * 2).max(10_000);
        let mut command = Command::new(&exe);
        command
            .arg("serve")
            .arg("--dev")
            .args(["--bind", "127.0.0.1"])
            .args(["--grpc-port", "0", "--quic-port", "0"])
            .args(["--http-port", "0", "--upload-port", "0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .args(["--grpc-max-streams", &max_streams.to_string()])
            .args(["--retain-changes", &retain.to_string()])
            // Every subscriber is `consumer-1/bench-<i>`: one identity holding N connections.
            .args([
                "--max-connections-per-identity",
                &(subscribers + 64).to_string(),
            ])
            .args(["--max-streams-per-identity", &max_streams.to_string()])
            .args(["--max-consumer-ids-per-identity", &max_streams.to_string()])
            // The publisher is one address and one secret, as fast as the run asks.
            .args(["--rate-limit-per-second", "0"])
            .current_dir(&dir)
            // Nothing of the operator's environment (HOOK_SECRET, REDIS_URL, ports) leaks in.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| BenchError::Spawn(format!("{}: {e}", exe.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Spawn("the core exited at once".to_owned()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Spawn("no stdout pipe".to_owned()))?;
        let mut core = Self {
            child,
            pid,
            dir,
            addrs: HashMap::new(),
        };
        core.addrs = tokio::time::timeout(READY_TIMEOUT, ready(stdout))
            .await
            .map_err(|_| {
                BenchError::Spawn(format!("not ready within {}s", READY_TIMEOUT.as_secs()))
            })??;
        tracing::info!(pid, addrs = ?core.addrs, "spawned core ready");
        Ok(core)
    }

    /// The process id, for `/proc` samples.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The endpoints of `transport` (empty when the core did not report one) and the dev
    /// credentials the core made.
    pub fn endpoints(&self, transport: TransportKind) -> Result<Endpoints, BenchError> {
        let name = match transport {
            TransportKind::Grpc => "grpc",
            TransportKind::Quic => "quic",
        };
        let addr = self
            .addrs
            .get(name)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let http = self
            .addrs
            .get("http")
            .ok_or_else(|| BenchError::Spawn("the core reported no http address".to_owned()))?;
        let certs = self.dir.join("certs");
        let [cert, key] = client_paths(&certs, DEV_CLIENT);
        Ok(Endpoints {
            addr,
            hook: hook_url(&format!("http://{http}"))?,
            hook_secret: hook_secret(&certs)?,
            ca: certs.join("ca.pem"),
            cert,
            key,
        })
    }

    /// SIGTERM, then SIGKILL if it has not exited within a few seconds.
    pub async fn stop(mut self) {
        terminate(&mut self.child, self.pid, "spawned core").await;
    }
}

/// SIGTERM to `child` (`pid`), then SIGKILL if it has not exited within 5 s.
pub async fn terminate(child: &mut Child, pid: u32, what: &str) {
    if let Some(id) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) {
        let _ = rustix::process::kill_process(id, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        tracing::warn!(pid, "{what} did not stop on SIGTERM; killing it");
        let _ = child.kill().await;
    }
}

impl Drop for SpawnedCore {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads the core's stdout until `workerpush: ready`, collecting `<name> listening on <addr>`;
/// then keeps draining it in the background so that the core never blocks on a full pipe.
async fn ready(stdout: ChildStdout) -> Result<HashMap<String, SocketAddr>, BenchError> {
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = HashMap::new();
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| BenchError::Spawn(format!("reading its output: {e}")))?
            .ok_or_else(|| BenchError::Spawn("exited before it was ready".to_owned()))?;
        let Some(rest) = line.strip_prefix("workerpush: ") else {
            continue;
        };
        if rest == "ready" {
            break;
        }
        if let Some((name, tail)) = rest.split_once(" listening on ")
            && let Some(addr) = tail.split_whitespace().next()
            && let Ok(addr) = addr.parse()
        {
            addrs.insert(name.to_owned(), addr);
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(addrs)
}

/// `HOOK_SECRET` of the `dev-secrets.env` that `serve --dev` wrote.
fn hook_secret(certs: &Path) -> Result<String, BenchError> {
    let path = certs.join(DEV_SECRETS);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BenchError::Spawn(format!("{}: {e}", path.display())))?;
    text.lines()
        .find_map(|line| line.strip_prefix("HOOK_SECRET="))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| BenchError::Spawn(format!("{} has no HOOK_SECRET", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_url_gets_the_hook_path_when_it_has_none() {
        assert_eq!(
            hook_url("http://127.0.0.1:8082").unwrap().as_str(),
            "http://127.0.0.1:8082/internal/broadcast"
        );
        assert_eq!(
            hook_url("https://core.example:8082/custom/hook")
                .unwrap()
                .as_str(),
            "https://core.example:8082/custom/hook"
        );
        assert!(hook_url("core:8082").is_err());
        assert!(hook_url("ftp://core/").is_err());
    }
}
