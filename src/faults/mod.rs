//! The fault harness: consumers over both transports, a publisher, injected faults, a record
//! of every event, and a checker of the delivery promises of `DESIGN.md` ("Delivery
//! semantics"). Test infrastructure: `tests/faults.rs` runs the short scenarios,
//! `examples/fault_harness.rs` the long ones. The servers never depend on it.
//!
//! # Layout
//! - [`udp`]: a seeded lossy UDP proxy (bursty loss, reordering, duplicates, blackholes).
//! - [`tcp`]: a TCP proxy that resets connections mid-stream, at random or all at once.
//! - [`process`]: the real `workerpush` binary and a private `redis-server`, killed with
//!   SIGKILL and restarted on the same ports and data.
//! - [`publish`]: a seeded plan of changes sent through the signed hook, retried through
//!   faults; every 2xx recorded.
//! - [`record`]: the recording [`crate::client::Handler`] (and a pause, for slow consumers).
//! - [`check`]: pure checks of a run: ordered, unique, reliable, resumable, convergent,
//!   durable acks.
//! - [`scenario`]: the scenarios and the runner that ties it all together.
//!
//! Every run is drawn from one seed, printed as `seed=<n>`; `FAULT_SEED=<n>` replays the same
//! plan, filters and fault schedule (timing on a real machine still varies).
//!
//! Depends on the client library, the contract, the hook's signing and the TLS module.

pub mod check;
pub mod process;
pub mod publish;
pub mod record;
pub mod scenario;
pub mod tcp;
pub mod udp;

/// Why the harness could not run (as opposed to a run that found violations).
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// A process, certificate or connection needed to run could not be had.
    #[error("setup: {0}")]
    Setup(String),
    /// A file or socket operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The seed to run with: `FAULT_SEED` if set (to replay a run), else a random one.
pub fn seed_from_env() -> u64 {
    std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(rand::random)
}
