//! The mutual-TLS QUIC transport (quinn, ALPN `workerpush/1`): the same five requests as gRPC,
//! one client-opened bidirectional stream per request, many subscriptions and fetches
//! multiplexed on one connection.
//!
//! - [`codec`]: the framing, pure functions over bytes (fuzzed and property-tested).
//! - [`frames`]: frames read off quinn streams, shared with the client library.
//! - [`serve`]: the server over the core; requests go through [`crate::requests`] like gRPC's,
//!   and errors become `Status` frames through the core's one mapping ([`crate::core::Coded`]).
//!
//! Depends on the core, the TLS module and the contract; the core knows nothing of it.

pub mod codec;
pub mod frames;
mod server;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

use std::{io, time::Duration};

pub use server::{CLOSE_RESOURCE_EXHAUSTED, QuicLimits, ResetSecret, serve};

/// Transport settings both sides share: keep-alives well inside the idle timeout, so idle
/// subscriptions stay up and a vanished peer is noticed, and no unidirectional streams.
pub(crate) fn transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
    max_bidi_streams: u32,
) -> io::Result<quinn::TransportConfig> {
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("idle timeout: {e}")))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(max_bidi_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    Ok(transport)
}
