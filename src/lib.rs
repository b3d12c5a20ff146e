//! workerpush: the push control plane of a self-hosted Workers platform.
//!
//! # Layout
//! - [`acl`]: which workers each certificate identity may see (the ACL file), reloadable.
//! - [`core`]: revisions, epochs, the retained log, subscriptions (replay, RESET, SYNCED),
//!   publishing, the consumer registry. No transport code.
//! - [`store`]: durable state behind one trait — memory, embedded files, Redis — and the
//!   fleet link ([`store::Fleet`]) through which cores sharing Redis see each other's
//!   propagation.
//! - [`pb`]: the wire contract generated from `proto/control_plane.proto`.
//! - [`tls`]: every rustls/rcgen piece: dev PKI, server and client configs, the one client
//!   verifier and identity extractor shared by gRPC and QUIC.
//! - [`requests`]: the contract's requests mapped onto the core (validation, identity rules),
//!   shared by both transports.
//! - [`peers`]: the info events of consumer connections (connected, disconnected, handshake
//!   failed), shared by both transports.
//! - [`quota`]: per-identity connection and stream quotas, shared by both transports.
//! - [`grpc`]: the mutual-TLS gRPC server over the core.
//! - [`quic`]: the mutual-TLS QUIC server over the core, and its pure framing codec.
//! - [`http`]: the signed hook and admin endpoints of the core, and the upload server.
//! - [`client`]: the consumer library (reconnect, resume, verify, ack) behind `watch`.
//! - [`config`], [`app`]: the typed configuration and the top level that binds and drains.
//! - [`logs`]: the log subscriber: `--log-format text|json`, colour only on a terminal, a bad
//!   `RUST_LOG` refused.
//! - [`telemetry`]: what `/metrics` adds to the layers' counters: every family at 0 from the
//!   start, build info, process metrics, the head revision and consumer lag.
//! - [`ctl`]: `workerpush ctl`, the operator's command line over the admin API.
//! - [`watch`]: `workerpush watch`, the edge agent: keeps worker code on disk, owning only what
//!   it made under `--out`, and acks once the files are durable and `--exec` accepted them.
//! - [`bench`]: `workerpush bench`, latency, throughput and loss through the real hook and
//!   transports.
//! - [`faults`]: test infrastructure — fault-injecting proxies, real processes to kill, a
//!   recording consumer and the checker of the delivery promises (`tests/faults.rs`).
#![warn(missing_docs)]

/// The crate's version, as `--version` and `workerpush_build_info` show it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit this binary was built from (`build.rs`): a short hash, or `unknown`.
pub const COMMIT: &str = env!("WORKERPUSH_COMMIT");
/// `--version`'s text: the version and the commit.
pub const VERSION_AND_COMMIT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WORKERPUSH_COMMIT"),
    ")"
);

pub mod acl;
pub mod app;
pub mod bench;
pub mod client;
pub mod config;
pub mod core;
pub mod ctl;
pub mod faults;
pub mod grpc;
pub mod http;
pub mod logs;
pub mod pb;
pub mod peers;
pub mod quic;
pub mod quota;
pub mod requests;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod watch;

/// An error and its causes in words, `: `-separated: what operators read in logs and
/// refusals (a `Debug` rendering such as tonic's `Error(Transport, ConnectError(…))` is not).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Some errors already end with their cause's words (tonic's transport errors do).
        let words = cause.to_string();
        if !text.ends_with(&words) {
            text.push_str(": ");
            text.push_str(&words);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("connect 127.0.0.1:1")]
        Connect(#[source] std::io::Error),
        #[error("transport error: {0}")]
        Repeats(#[source] std::io::Error),
    }

    fn refused() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused")
    }

    #[test]
    fn an_error_chain_is_said_in_words_each_cause_once() {
        assert_eq!(
            error_chain(&Outer::Connect(refused())),
            "connect 127.0.0.1:1: connection refused"
        );
        assert_eq!(
            error_chain(&Outer::Repeats(refused())),
            "transport error: connection refused"
        );
    }
}
