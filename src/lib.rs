//! workerpush: the push control plane of a self-hosted Workers platform.
//!
//! # Layout
//! - [`core`]: revisions, epochs, the retained log, subscriptions (replay, RESET, SYNCED),
//!   publishing, the consumer registry. No transport code.
//! - [`store`]: durable state behind one trait — memory, embedded files, Redis.
//! - [`http`]: the core's signed hook and probes, the upload API that forwards to it, and
//!   [`http::serve`], which runs either on a bound listener with timeouts and a graceful drain.
//! - [`pb`]: the wire contract generated from `proto/control_plane.proto`.
#![warn(missing_docs)]

pub mod core;
pub mod http;
pub mod pb;
pub mod store;
