//! `workerpush watch`: the edge agent. Keeps the current code of each worker under
//! `DIR/<worker>/<version>/worker.js`, prints one line per event, and acks a change only once
//! its files are durable and `--exec` (if given) accepted it.
//!
//! It owns only what it created under `--out` ([`out_dir`]: a lock, a manifest, no write or
//! removal through a link it did not make), refuses and nacks what it cannot fetch or verify
//! without stopping the feed, and keeps its resume position in `DIR/.workerpush-position.json`.

pub mod exec;
pub mod out_dir;

use std::{collections::BTreeSet, io::Write, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use exec::Exec;
pub use out_dir::{OutDir, OutDirError, POSITION_FILE};

use crate::{
    client::{
        ClientError, Consumer, ConsumerOptions, FailoverTransport, GrpcTransport, Handler,
        Position, QuicTransport, Refusal, Transport,
    },
    config::{TransportKind, WatchArgs},
    core::{Version, WorkerName},
    pb::{UpdateKind, WorkerUpdate},
    tls::{self, ClientTlsPurpose},
};

/// Why `watch` stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// `--out` cannot be used (locked, another deployment's, unreadable).
    #[error(transparent)]
    OutDir(#[from] OutDirError),
    /// The client could not go on (configuration, or a refusal retrying cannot fix).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `--once` synced, but some changes were refused.
    #[error("synced, but {0} not applied: {1}")]
    Incomplete(usize, String),
}

impl WatchError {
    /// The process exit code: 75 (`EX_TEMPFAIL`) when another agent holds `--out`, 73
    /// (`EX_CANTCREAT`) when `--out` belongs to another deployment or cannot be written, 78
    /// (`EX_CONFIG`) for configuration, 2 when `--once` synced with refusals, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::OutDir(OutDirError::Locked(_)) => 75,
            Self::OutDir(_) => 73,
            Self::Client(ClientError::Config(_)) => 78,
            Self::Incomplete(..) => 2,
            Self::Client(_) => 1,
        }
    }
}

/// The position file: where to resume, and which workers were refused (a restart with any
/// resumes from scratch, so that their bundles are fetched again).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedPosition {
    #[serde(flatten)]
    position: Option<Position>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    unapplied: BTreeSet<String>,
}

/// Runs the watcher until `shutdown`, `--once`'s SYNCED, or a refusal retrying cannot fix.
pub async fn run(args: WatchArgs, shutdown: CancellationToken) -> Result<(), WatchError> {
    // A CA that cannot be read is a configuration error before `--out` is touched.
    std::fs::metadata(&args.ca)
        .map_err(|e| ClientError::Config(format!("--ca {}: {e}", args.ca.display())))?;
    // Who writes this `--out`: the consumer id. Not the CA file, which a rotation rewrites
    // (README, "Rotation and revocation") while the deployment stays the same.
    let deployment = format!("consumer {:?}", args.consumer_id);
    let out = OutDir::open(&args.out, &deployment)?;
    let saved: SavedPosition = out
        .read(POSITION_FILE)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let position = saved.position.filter(|_| saved.unapplied.is_empty());
    let options = ConsumerOptions {
        consumer_id: args.consumer_id.clone(),
        workers: (args.workers.iter())
            .filter(|w| !w.is_empty())
            .cloned()
            .collect(),
        ack: true,
        endpoint: args.endpoint.clone(),
        labels: args.labels.iter().cloned().collect(),
        max_code_bytes: args.max_code_bytes,
        ..ConsumerOptions::default()
    };
    let stop = shutdown.child_token();
    let mut handler = WatchHandler {
        out,
        json: args.json,
        exec: args.exec.clone().map(|command| Exec {
            command,
            timeout: args.exec_timeout,
        }),
        once: args.once.then(|| stop.clone()),
        refusals: 0,
        unapplied: BTreeSet::new(),
    };
    let transport = transport(&args)?;
    let mut consumer = Consumer::new(transport, options, position);
    let mut result = consumer.run(&mut handler, stop).await;
    if result.is_ok() && args.deregister {
        // A clean exit: this host stops counting among its workers' subscribers.
        result = consumer.deregister().await.map(drop);
    }
    consumer.close().await;
    result?;
    if args.once && !handler.unapplied.is_empty() {
        let names: Vec<&str> = handler.unapplied.iter().map(String::as_str).collect();
        return Err(WatchError::Incomplete(names.len(), names.join(", ")));
    }
    Ok(())
}

/// One transport per `--addr`, failing over between them.
fn transport(args: &WatchArgs) -> Result<FailoverTransport, ClientError> {
    let purpose = match args.transport {
        TransportKind::Grpc => ClientTlsPurpose::Grpc,
        TransportKind::Quic => ClientTlsPurpose::Quic,
    };
    let tls = tls::client_config(&args.ca, &args.cert, &args.key, purpose)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut transports: Vec<Box<dyn Transport>> = Vec::new();
    for addr in args.addr.iter().filter(|a| !a.is_empty()) {
        transports.push(match args.transport {
            TransportKind::Grpc => Box::new(
                GrpcTransport::new(addr, tls.clone())?.with_max_code_bytes(args.max_code_bytes),
            ),
            TransportKind::Quic => Box::new(
                QuicTransport::new(addr, tls.clone())?.with_max_code_bytes(args.max_code_bytes),
            ),
        });
    }
    FailoverTransport::new(transports)
}

struct WatchHandler {
    out: OutDir,
    json: bool,
    exec: Option<Exec>,
    /// Cancelled at the first SYNCED with `--once`.
    once: Option<CancellationToken>,
    /// Changes refused so far (invalid, unfetchable, unverified, not written, `--exec` said no).
    refusals: u64,
    /// Workers whose latest change was refused.
    unapplied: BTreeSet<String>,
}

/// The kind of an update, as printed.
fn kind_name(update: &WorkerUpdate) -> &'static str {
    match UpdateKind::try_from(update.kind) {
        Ok(UpdateKind::Put) => "PUT",
        Ok(UpdateKind::Delete) => "DELETE",
        Ok(UpdateKind::Reset) => "RESET",
        Ok(UpdateKind::Synced) => "SYNCED",
        _ => "UNSPECIFIED",
    }
}

/// A string from the server as it may be printed: control characters and quotes escaped, cut
/// at 80 characters (only refusals print strings that were not validated).
fn escaped(text: &str) -> String {
    let cut: String = text.chars().take(80).collect();
    let quoted = format!("{cut:?}");
    quoted[1..quoted.len() - 1].to_owned()
}

impl WatchHandler {
    /// One event line. `note` is the reason a change was refused; `unchanged` marks a PUT
    /// already on disk.
    fn print(&self, update: &WorkerUpdate, note: Option<&str>, unchanged: bool) {
        let kind = kind_name(update);
        let line = if self.json {
            // JSON escapes every control character itself.
            let mut value = json!({
                "kind": kind,
                "revision": update.revision,
                "epoch": update.epoch,
                "worker_name": update.worker_name,
                "version": update.version,
                "checksum": update.checksum,
                "size": update.size,
                "timestamp": update.timestamp,
            });
            if let Some(note) = note {
                value["error"] = json!(note);
                value["refused"] = json!(true);
                value["refusals"] = json!(self.refusals);
            }
            if unchanged {
                value["unchanged"] = json!(true);
            }
            value.to_string()
        } else {
            match kind {
                "PUT" | "DELETE" => format!(
                    "{kind:<6} {} {} revision={} sha256={} size={}{}{}",
                    escaped(&update.worker_name),
                    escaped(&update.version),
                    update.revision,
                    escaped(&update.checksum),
                    update.size,
                    if unchanged { " unchanged" } else { "" },
                    note.map(|n| format!(" refused={n:?} refusals={}", self.refusals))
                        .unwrap_or_default()
                ),
                _ => format!(
                    "{kind:<6} revision={} epoch={}",
                    update.revision,
                    escaped(&update.epoch)
                ),
            }
        };
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }

    /// Prints and counts the outcome of a change of `worker`, and passes it on.
    fn outcome(
        &mut self,
        update: &WorkerUpdate,
        result: Result<bool, String>,
    ) -> Result<(), String> {
        match result {
            Ok(unchanged) => {
                self.unapplied.remove(&update.worker_name);
                self.print(update, None, unchanged);
                Ok(())
            }
            Err(reason) => {
                self.refused_change(update, &reason);
                Err(reason)
            }
        }
    }

    fn refused_change(&mut self, update: &WorkerUpdate, reason: &str) {
        self.refusals += 1;
        self.unapplied.insert(update.worker_name.clone());
        self.print(update, Some(reason), false);
    }

    /// Writes the version beside the current one, lets `--exec` judge it, and only then makes
    /// it current. `Ok(true)`: it was on disk already.
    async fn apply_put(&mut self, update: &WorkerUpdate, code: &[u8]) -> Result<bool, String> {
        let worker = WorkerName::parse(&update.worker_name).map_err(|e| e.to_string())?;
        let version = Version::parse(&update.version).map_err(|e| e.to_string())?;
        let checksum = update.checksum.to_ascii_lowercase();
        if self.out.holds(&worker, &version, &checksum) {
            return Ok(true);
        }
        let staged = self.out.stage(&worker, &version, &checksum, code)?;
        if let Some(exec) = &self.exec {
            let change = exec::Change {
                kind: "put",
                worker: worker.as_str(),
                version: version.as_str(),
                path: &staged.path,
                checksum: &checksum,
                revision: update.revision,
            };
            if let Err(reason) = exec.run(&change).await {
                if let Err(error) = self.out.discard(staged) {
                    tracing::warn!(%error, "could not take back a refused version");
                }
                return Err(reason);
            }
        }
        self.out.commit(&staged)?;
        Ok(false)
    }

    async fn apply_delete(&mut self, update: &WorkerUpdate) -> Result<bool, String> {
        let worker = WorkerName::parse(&update.worker_name).map_err(|e| e.to_string())?;
        self.out.remove_worker(&worker)?;
        if let Some(exec) = &self.exec {
            let path = self.out.root().join(worker.as_str());
            let change = exec::Change {
                kind: "delete",
                worker: worker.as_str(),
                version: &update.version,
                path: &path,
                checksum: "",
                revision: update.revision,
            };
            exec.run(&change).await?;
        }
        Ok(false)
    }
}

#[async_trait]
impl Handler for WatchHandler {
    async fn put(&mut self, update: &WorkerUpdate, code: Bytes) -> Result<(), String> {
        let result = self.apply_put(update, &code).await;
        self.outcome(update, result)
    }

    async fn holds(&mut self, update: &WorkerUpdate) -> bool {
        let (Ok(worker), Ok(version)) = (
            WorkerName::parse(&update.worker_name),
            Version::parse(&update.version),
        ) else {
            return false;
        };
        let held = (self.out).holds(&worker, &version, &update.checksum.to_ascii_lowercase());
        if held {
            // Not fetched, not written, not told to `--exec` again: it is what runs.
            let _ = self.outcome(update, Ok(true));
        }
        held
    }

    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String> {
        let result = self.apply_delete(update).await;
        self.outcome(update, result)
    }

    async fn reset(&mut self, update: &WorkerUpdate) {
        self.print(update, None, false);
    }

    async fn synced(&mut self, update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>) {
        if let Some(keep) = snapshot {
            for worker in self.out.retain(keep) {
                tracing::info!(%worker, "removed: not in the snapshot");
            }
            self.unapplied.retain(|w| keep.contains(w));
        }
        self.print(update, None, false);
        if let Some(once) = &self.once {
            once.cancel();
        }
    }

    fn refused(&mut self, update: &WorkerUpdate, refusal: &Refusal) {
        self.refused_change(update, &refusal.reason);
    }

    async fn position(&mut self, position: &Position) {
        let saved = SavedPosition {
            position: Some(position.clone()),
            unapplied: self.unapplied.clone(),
        };
        if let Ok(text) = serde_json::to_vec(&saved)
            && let Err(error) = self.out.write_file(POSITION_FILE, &text)
        {
            tracing::warn!(%error, "could not save the resume position");
        }
    }

    fn connected(&mut self, transport: &str) {
        tracing::info!(transport, "subscribed");
    }

    fn disconnected(&mut self, error: &ClientError, retry_in: Duration) {
        tracing::warn!(%error, ?retry_in, "disconnected; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_from_the_server_are_escaped_before_printing() {
        assert_eq!(escaped("a\0b\x1b[2J\"c"), "a\\0b\\u{1b}[2J\\\"c");
        assert_eq!(escaped(&"x".repeat(200)).len(), 80);
    }
}
