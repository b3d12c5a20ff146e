//! workerpush: the push control plane of a self-hosted Workers platform.
//!
//! # Layout
//! - [`core`]: revisions, epochs, the retained log, subscriptions (replay, RESET, SYNCED),
//!   publishing, the consumer registry. No transport code.
//! - [`store`]: durable state behind one trait — memory, embedded files, Redis.
//! - [`pb`]: the wire contract generated from `proto/control_plane.proto`.
//! - [`tls`]: every rustls/rcgen piece: dev PKI, server and client configs, the one client
//!   verifier and identity extractor shared by gRPC and QUIC.
//! - [`grpc`]: the mutual-TLS gRPC server over the core.
//! - [`http`]: the signed hook and admin endpoints of the core, and the upload server.
//! - [`client`]: the consumer library (reconnect, resume, verify, ack) behind `watch`.
//! - [`config`], [`app`]: the typed configuration and the top level that binds and drains.
//! - [`watch`]: `workerpush watch`, a consumer that keeps worker code on disk.
//! - [`bench`]: `workerpush bench`, latency, throughput and loss through the real hook and
//!   transports.
#![warn(missing_docs)]

pub mod app;
pub mod bench;
pub mod client;
pub mod config;
pub mod core;
pub mod grpc;
pub mod http;
pub mod pb;
pub mod store;
pub mod tls;
pub mod watch;
