//! An edge client over QUIC: subscribe with mutual TLS to some workers, verify every bundle,
//! acknowledge it, and on any disconnect reconnect with jittered backoff and resume from the
//! last revision held — all done by the shared client library's `Consumer`.
//!
//! ```sh
//! cargo run --example quic_client -- --addr localhost:50052 --ca certs/ca.pem \
//!   --cert certs/clients/consumer-1.pem --key certs/clients/consumer-1-key.pem \
//!   --consumer-id consumer-1 --workers worker1,worker2
//! ```

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use workerpush::{
    client::{ClientError, Consumer, ConsumerOptions, Handler, QuicTransport},
    pb::WorkerUpdate,
    tls::{self, ClientTlsPurpose},
};

/// Subscribe to worker updates over QUIC and print each event.
#[derive(Parser)]
struct Args {
    /// The core's QUIC address, `host:port`; the host must match the server certificate.
    #[arg(long, default_value = "localhost:50052")]
    addr: String,
    /// The CA that signed the server certificate.
    #[arg(long, default_value = "certs/ca.pem")]
    ca: PathBuf,
    /// This client's certificate.
    #[arg(long, default_value = "certs/clients/consumer-1.pem")]
    cert: PathBuf,
    /// This client's private key.
    #[arg(long, default_value = "certs/clients/consumer-1-key.pem")]
    key: PathBuf,
    /// Empty means the certificate's identity; `identity/suffix` names one of several runtimes.
    #[arg(long, default_value = "")]
    consumer_id: String,
    /// Comma-separated worker names; empty means every worker.
    #[arg(long, value_delimiter = ',')]
    workers: Vec<String>,
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
            "DELETE {} {} (revision {})",
            update.worker_name, update.version, update.revision
        );
        Ok(())
    }

    async fn reset(&mut self, update: &WorkerUpdate) {
        println!("RESET (epoch {}): a full snapshot follows", update.epoch);
    }

    async fn synced(&mut self, update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>) {
        match snapshot {
            Some(names) => println!("SYNCED at {} holding {names:?}", update.revision),
            None => println!("SYNCED at {}", update.revision),
        }
    }

    fn connected(&mut self, transport: &str) {
        eprintln!("connected over {transport}");
    }

    fn disconnected(&mut self, error: &ClientError, retry_in: Duration) {
        eprintln!("disconnected ({error}); reconnecting in {retry_in:?}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let args = Args::parse();
    let config = tls::client_config(&args.ca, &args.cert, &args.key, ClientTlsPurpose::Quic)?;
    let transport = QuicTransport::new(&args.addr, config)?;
    let options = ConsumerOptions {
        consumer_id: args.consumer_id,
        workers: args.workers,
        ack: true,
        ..ConsumerOptions::default()
    };
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        }
    });
    Consumer::new(transport, options, None)
        .run(&mut Printer, shutdown)
        .await?;
    Ok(())
}
