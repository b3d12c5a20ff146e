//! The seed's consumer example, done right: subscribe over mutual-TLS gRPC to a comma-separated
//! list of workers, verify every bundle, acknowledge it, and on any disconnect reconnect with
//! jittered backoff and resume from the last revision (no replay from scratch, no gaps).
//!
//! ```sh
//! cargo run --example consumer_client -- -addr localhost:50051 -consumer-id consumer-1 \
//!   -workers worker1,worker2 -certs certs
//! ```
//! Flags take one or two dashes. `-certs DIR` expects `ca.pem` and `clients/<id>.pem` + `-key.pem`.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use workerpush::{
    client::{ClientError, Consumer, ConsumerOptions, GrpcTransport, Handler, Position},
    pb::WorkerUpdate,
    tls::{self, ClientTlsPurpose},
};

struct Args {
    addr: String,
    consumer_id: String,
    workers: Vec<String>,
    certs: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        addr: "localhost:50051".into(),
        consumer_id: "consumer-1".into(),
        workers: Vec::new(),
        certs: "certs".into(),
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.trim_start_matches('-') {
            "addr" => args.addr = value,
            "consumer-id" => args.consumer_id = value,
            "workers" => {
                args.workers = value
                    .split(',')
                    .map(str::trim)
                    .filter(|w| !w.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "certs" => args.certs = value.into(),
            other => bail!("unknown flag -{other} (use -addr, -consumer-id, -workers, -certs)"),
        }
    }
    Ok(args)
}

/// Prints what it applies; a real edge host would load the code into its runtime here.
struct Printer;

#[async_trait]
impl Handler for Printer {
    async fn put(&mut self, update: &WorkerUpdate, code: Bytes) -> Result<(), String> {
        println!(
            "PUT {} {} (revision {}, {} bytes, sha256 {} verified)",
            update.worker_name,
            update.version,
            update.revision,
            code.len(),
            update.checksum
        );
        Ok(())
    }

    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String> {
        println!(
            "DELETE {} (revision {})",
            update.worker_name, update.revision
        );
        Ok(())
    }

    async fn synced(&mut self, update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>) {
        match snapshot {
            Some(names) => println!(
                "SYNCED at {} after a full snapshot of {names:?}",
                update.revision
            ),
            None => println!("SYNCED at {}", update.revision),
        }
    }

    async fn position(&mut self, _position: &Position) {}

    fn disconnected(&mut self, error: &ClientError, retry_in: Duration) {
        eprintln!("disconnected ({error}); reconnecting in {retry_in:?}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let args = parse_args()?;
    let identity = args.consumer_id.split('/').next().unwrap_or_default();
    let config = tls::client_config(
        &args.certs.join("ca.pem"),
        &args.certs.join(format!("clients/{identity}.pem")),
        &args.certs.join(format!("clients/{identity}-key.pem")),
        ClientTlsPurpose::Grpc,
    )?;
    let transport = GrpcTransport::new(&args.addr, config)?;
    let options = ConsumerOptions {
        consumer_id: args.consumer_id,
        workers: args.workers,
        ack: true,
        ..ConsumerOptions::default()
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    Consumer::new(transport, options, None)
        .run(&mut Printer, shutdown)
        .await?;
    Ok(())
}
