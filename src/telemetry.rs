//! What `/metrics` shows beyond the counters each layer records as things happen: every
//! documented family present from the start (at 0, with the label values the README names),
//! `# HELP` on the families the layers do not describe, `workerpush_build_info`, the process
//! metrics (`process_*`, the names and types Prometheus' client libraries use) and gauges read off the
//! core at each scrape (`workerpush_head_revision`, consumer lag).
//!
//! Depends on the core for what it reads, and on the `metrics` facade only: the exporter is
//! installed by `app`.

use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::core::Core;

/// The transports, as the `transport` label says them.
const TRANSPORTS: [&str; 2] = ["grpc", "quic"];

/// The `limit` label values of `workerpush_limit_refusals_total` (the README's Limits table).
pub const LIMITS: &[&str] = &[
    "quic_connections",
    "grpc_connections_per_identity",
    "quic_connections_per_identity",
    "grpc_streams_per_identity",
    "quic_streams_per_identity",
    "grpc_streams",
    "quic_subscriptions",
    "http_first_request_timeout",
    "upload_body_budget",
    "hook_body_budget",
    "upload_rate",
    "hook_rate",
    "hook_auth_failures",
    "upload_auth_failures",
];

/// The `reason` values of `workerpush_hook_refusals_total` the README names.
const HOOK_REFUSALS: &[&str] = &[
    "bad_signature",
    "replayed",
    "stale_timestamp",
    "conflict",
    "invalid_wait",
];

/// The `reason` values of `workerpush_upload_refusals_total` the README names.
const UPLOAD_REFUSALS: &[&str] = &[
    "unauthenticated",
    "forbidden",
    "too_large",
    "core_rejected",
    "invalid_wait",
];

/// Describes the families the layers leave undescribed, and registers every documented series
/// at 0 so that dashboards and `rate()` see them before the first event. `embedded_store`:
/// the file store's own families too.
pub fn start(embedded_store: bool) {
    describe();
    for transport in TRANSPORTS {
        gauge!("workerpush_subscribers", "transport" => transport).set(0.0);
        counter!("workerpush_deliveries_total", "transport" => transport).absolute(0);
        counter!("workerpush_sent_bytes_total", "transport" => transport).absolute(0);
        counter!("workerpush_handshake_failures_total", "transport" => transport).absolute(0);
        // Registered, not recorded: an empty histogram, every bucket at 0.
        let _ = histogram!("workerpush_delivery_latency_seconds", "transport" => transport);
        let _ = histogram!("workerpush_ack_latency_seconds", "transport" => transport);
    }
    for start in ["replay", "reset"] {
        counter!("workerpush_subscriptions_total", "start" => start).absolute(0);
    }
    for reason in ["lagged", "resume_ahead"] {
        counter!("workerpush_resyncs_total", "reason" => reason).absolute(0);
    }
    for kind in ["put", "delete"] {
        counter!("workerpush_changes_published_total", "kind" => kind).absolute(0);
    }
    for outcome in ["applied", "failed"] {
        counter!("workerpush_acks_total", "outcome" => outcome).absolute(0);
    }
    for reason in HOOK_REFUSALS {
        counter!("workerpush_hook_refusals_total", "reason" => *reason).absolute(0);
    }
    for reason in UPLOAD_REFUSALS {
        counter!("workerpush_upload_refusals_total", "reason" => *reason).absolute(0);
    }
    for limit in LIMITS {
        counter!("workerpush_limit_refusals_total", "limit" => *limit).absolute(0);
    }
    // The core's own bounds (consumer ids, departures, labels, filters).
    crate::core::Bound::register_counters();
    counter!("workerpush_upload_core_retries_total").absolute(0);
    counter!("workerpush_acl_denials_total").absolute(0);
    counter!("workerpush_quic_bad_requests_total").absolute(0);
    counter!("workerpush_store_reseeds_total").absolute(0);
    counter!("workerpush_synced_behind_store_total").absolute(0);
    counter!("workerpush_deregistrations_total").absolute(0);
    if embedded_store {
        counter!("workerpush_store_failures_total").absolute(0);
        let _ = histogram!("workerpush_store_group_commit_changes");
        let _ = histogram!("workerpush_store_log_sync_seconds");
    }
    gauge!(
        "workerpush_build_info",
        "version" => crate::VERSION,
        "commit" => crate::COMMIT
    )
    .set(1.0);
}

/// Reads what is measured rather than counted, just before a scrape renders.
pub fn refresh(core: &Core) {
    gauge!("workerpush_head_revision").set(core.head() as f64);
    let (mut lagging, mut worst, mut connected) = (0u64, 0usize, 0u64);
    for consumer in core.consumers_status().iter().filter(|c| c.connected) {
        connected += 1;
        if consumer.lag > 0 {
            lagging += 1;
        }
        worst = worst.max(consumer.lag);
    }
    gauge!("workerpush_consumers_connected").set(connected as f64);
    gauge!("workerpush_consumers_lagging").set(lagging as f64);
    gauge!("workerpush_consumer_lag_workers_max").set(worst as f64);
}

/// The `process_*` families in Prometheus text, read from `/proc/self` at each scrape and
/// appended to the exporter's page (the `metrics` facade has no float counters, and CPU time
/// is one). A value that cannot be read is left out.
pub fn process_text(started: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    if let Ok(sample) = crate::bench::host::ProcessSample::own() {
        family(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time of this process, in seconds.",
            sample.cpu_seconds,
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of this process, in bytes.",
            (sample.rss_kib * 1024) as f64,
        );
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        family(
            "process_open_fds",
            "gauge",
            "Open file descriptors of this process.",
            entries.count() as f64,
        );
    }
    if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        family(
            "process_max_fds",
            "gauge",
            "The soft open file descriptor limit of this process.",
            max as f64,
        );
    }
    family(
        "process_start_time_seconds",
        "gauge",
        "When this process started serving metrics, in Unix seconds.",
        started,
    );
    out
}

/// Now, in Unix seconds, for `process_start_time_seconds`.
pub fn unix_seconds_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn describe() {
    describe_counter!(
        "workerpush_limit_refusals_total",
        "Requests, streams and connections refused at a limit, by limit (see the README's Limits table)"
    );
    describe_counter!(
        "workerpush_upload_core_retries_total",
        "Upload server retries of a core it could not reach"
    );
    describe_counter!(
        "workerpush_handshake_failures_total",
        "TLS and QUIC handshakes that failed or timed out, by transport"
    );
    describe_counter!(
        "workerpush_acl_denials_total",
        "Requests for workers the caller's identity may not see (the ACL)"
    );
    describe_counter!(
        "workerpush_quic_bad_requests_total",
        "QUIC request frames that did not decode"
    );
    describe_counter!(
        "workerpush_store_reseeds_total",
        "Times this core re-seeded a store that lost its history, in a new epoch"
    );
    describe_counter!(
        "workerpush_synced_behind_store_total",
        "Subscriptions whose first SYNCED could not wait for the store's head"
    );
    describe_counter!(
        "workerpush_deregistrations_total",
        "Consumers deregistered (DeregisterConsumer or DELETE /v1/consumers/{id}) on this core"
    );
    describe_counter!(
        "workerpush_store_failures_total",
        "Embedded store writes that failed (the store fences itself and refuses changes)"
    );
    describe_histogram!(
        "workerpush_store_group_commit_changes",
        "Changes made durable by one fsync of the embedded store's log"
    );
    describe_histogram!(
        "workerpush_store_log_sync_seconds",
        Unit::Seconds,
        "Time of one fsync of the embedded store's log"
    );
    describe_gauge!(
        "workerpush_build_info",
        "Always 1; the labels say which build is running (version, commit)"
    );
    describe_gauge!(
        "workerpush_head_revision",
        "The highest revision this core has made visible"
    );
    describe_gauge!(
        "workerpush_consumers_connected",
        "Consumers with a live subscription on this core"
    );
    describe_gauge!(
        "workerpush_consumers_lagging",
        "Connected consumers that do not hold the latest version of every worker they follow"
    );
    describe_gauge!(
        "workerpush_consumer_lag_workers_max",
        "The most workers any one connected consumer is behind on"
    );
}
