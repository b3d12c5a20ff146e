//! `workerpush watch`: a consumer that keeps the current code of each worker under
//! `DIR/<worker>/<version>/worker.js`, prints one line per event, acks what it applied, and
//! keeps its resume position in `DIR/.workerpush-position.json`.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    client::{
        ClientError, Consumer, ConsumerOptions, GrpcTransport, Handler, Position, QuicTransport,
        Transport,
    },
    config::{TransportKind, WatchArgs},
    core::{Version, WorkerName},
    pb::{UpdateKind, WorkerUpdate},
    tls::{self, ClientTlsPurpose},
};

/// The file under `--out` holding the resume position.
pub const POSITION_FILE: &str = ".workerpush-position.json";

/// Runs the watcher until `shutdown` or a refusal that retrying cannot fix.
pub async fn run(args: WatchArgs, shutdown: CancellationToken) -> Result<(), ClientError> {
    std::fs::create_dir_all(&args.out)
        .map_err(|e| ClientError::Config(format!("{}: {e}", args.out.display())))?;
    let position = read_position(&args.out);
    let options = ConsumerOptions {
        consumer_id: args.consumer_id.clone(),
        workers: args
            .workers
            .iter()
            .filter(|w| !w.is_empty())
            .cloned()
            .collect(),
        ack: true,
        ..ConsumerOptions::default()
    };
    let mut handler = WatchHandler {
        out: args.out.clone(),
        json: args.json,
    };
    match args.transport {
        TransportKind::Grpc => {
            let tls = tls::client_config(&args.ca, &args.cert, &args.key, ClientTlsPurpose::Grpc)
                .map_err(|e| ClientError::Config(e.to_string()))?;
            let transport = GrpcTransport::new(&args.addr, tls)?;
            run_with(transport, options, position, &mut handler, shutdown, &args).await
        }
        TransportKind::Quic => {
            let tls = tls::client_config(&args.ca, &args.cert, &args.key, ClientTlsPurpose::Quic)
                .map_err(|e| ClientError::Config(e.to_string()))?;
            let transport = QuicTransport::new(&args.addr, tls)?;
            run_with(transport, options, position, &mut handler, shutdown, &args).await
        }
    }
}

async fn run_with<T: Transport>(
    transport: T,
    options: ConsumerOptions,
    position: Option<Position>,
    handler: &mut WatchHandler,
    shutdown: CancellationToken,
    args: &WatchArgs,
) -> Result<(), ClientError> {
    let mut consumer = Consumer::new(transport, options, position);
    consumer.run(handler, shutdown).await?;
    if args.deregister {
        consumer.deregister().await?;
    }
    Ok(())
}

struct WatchHandler {
    out: PathBuf,
    json: bool,
}

impl WatchHandler {
    fn print(&self, update: &WorkerUpdate, note: Option<&str>) {
        let kind = match UpdateKind::try_from(update.kind) {
            Ok(UpdateKind::Put) => "PUT",
            Ok(UpdateKind::Delete) => "DELETE",
            Ok(UpdateKind::Reset) => "RESET",
            Ok(UpdateKind::Synced) => "SYNCED",
            _ => "UNSPECIFIED",
        };
        let line = if self.json {
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
            }
            value.to_string()
        } else {
            match kind {
                "PUT" | "DELETE" => format!(
                    "{kind:<6} {} {} revision={} sha256={} size={}{}",
                    update.worker_name,
                    update.version,
                    update.revision,
                    update.checksum,
                    update.size,
                    note.map(|n| format!(" error={n:?}")).unwrap_or_default()
                ),
                _ => format!(
                    "{kind:<6} revision={} epoch={}",
                    update.revision, update.epoch
                ),
            }
        };
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }

    /// `DIR/<worker>`, only for a valid worker name (never a path outside `DIR`).
    fn worker_dir(&self, name: &str) -> Result<PathBuf, String> {
        let worker = WorkerName::parse(name).map_err(|e| e.to_string())?;
        Ok(self.out.join(worker.as_str()))
    }
}

#[async_trait]
impl Handler for WatchHandler {
    async fn put(&mut self, update: &WorkerUpdate, code: Bytes) -> Result<(), String> {
        let result = (|| {
            let dir = self.worker_dir(&update.worker_name)?;
            let version = Version::parse(&update.version).map_err(|e| e.to_string())?;
            let version_dir = dir.join(version.as_str());
            std::fs::create_dir_all(&version_dir).map_err(|e| e.to_string())?;
            write_atomic(&version_dir.join("worker.js"), &code).map_err(|e| e.to_string())?;
            remove_other_versions(&dir, version.as_str()).map_err(|e| e.to_string())
        })();
        self.print(update, result.as_ref().err().map(String::as_str));
        result
    }

    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String> {
        let result = self.worker_dir(&update.worker_name).and_then(|dir| {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            }
        });
        self.print(update, result.as_ref().err().map(String::as_str));
        result
    }

    async fn reset(&mut self, update: &WorkerUpdate) {
        self.print(update, None);
    }

    async fn synced(&mut self, update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>) {
        if let Some(keep) = snapshot
            && let Ok(entries) = std::fs::read_dir(&self.out)
        {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_worker = WorkerName::parse(&name).is_ok() && entry.path().is_dir();
                if is_worker && !keep.contains(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.print(update, None);
    }

    async fn position(&mut self, position: &Position) {
        if let Ok(text) = serde_json::to_vec(position)
            && let Err(error) = write_atomic(&self.out.join(POSITION_FILE), &text)
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

fn read_position(out: &Path) -> Option<Position> {
    let text = std::fs::read(out.join(POSITION_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn remove_other_versions(worker_dir: &Path, keep: &str) -> std::io::Result<()> {
    for entry in std::fs::read_dir(worker_dir)? {
        let entry = entry?;
        if entry.file_name() != keep && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}
