//! The operator's record of consumer connections, shared by both transports: one info event
//! when a verified peer's connection is up (`consumer connected`) and one when it is gone
//! (`consumer disconnected`), each with `transport`, `identity` and `remote`.
//!
//! Depends on nothing but `tracing`; the transports hold a [`ConnectionRecord`] for as long as
//! the connection lives.

use std::{net::SocketAddr, sync::Arc, time::Instant};

/// Held for the life of one verified connection; logs its end when dropped.
#[derive(Debug)]
pub struct ConnectionRecord {
    transport: &'static str,
    identity: Arc<str>,
    remote: SocketAddr,
    since: Instant,
}

impl ConnectionRecord {
    /// Logs that `identity` connected from `remote` over `transport`.
    pub fn connected(transport: &'static str, identity: Arc<str>, remote: SocketAddr) -> Self {
        tracing::info!(transport, identity = %identity, %remote, "consumer connected");
        Self {
            transport,
            identity,
            remote,
            since: Instant::now(),
        }
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        tracing::info!(
            transport = self.transport,
            identity = %self.identity,
            remote = %self.remote,
            connected_ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            "consumer disconnected"
        );
    }
}

/// Logs a handshake that failed, with its reason in words.
pub fn handshake_failed(transport: &'static str, remote: SocketAddr, reason: &str) {
    tracing::info!(transport, %remote, reason, "handshake failed");
}
