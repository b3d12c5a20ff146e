//! The fault suite: each scenario runs the real binary, consumers over gRPC and QUIC, the
//! publisher and one fault, records every event and checks the delivery promises (see
//! `workerpush::faults`). Short variants; `examples/fault_harness.rs` runs long ones.
//!
//! Each run prints `seed=<n>`; `FAULT_SEED=<n> cargo test --test faults <scenario>` replays it.
//! Scenarios run one at a time (a lock), so that they do not starve each other on a small
//! machine and their timings mean something.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use workerpush::faults::{
    scenario::{self, Scenario, Setup},
    seed_from_env,
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(scenario: Scenario) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let setup = Setup {
        workerpush: PathBuf::from(env!("CARGO_BIN_EXE_workerpush")),
        redis_server: PathBuf::from(
            std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned()),
        ),
    };
    let report = scenario::run(&scenario, seed_from_env(), &setup)
        .await
        .expect("the harness runs");
    print!("{report}");
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_consumers_behind_ten_percent_bursty_loss_get_every_change_once_in_order() {
    run(Scenario::quic_loss()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_reset_mid_stream_resume_without_loss_or_duplicates() {
    run(Scenario::tcp_cuts()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9_cycles_of_the_core_lose_no_acknowledged_change() {
    run(Scenario::core_kill()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run_loses_no_acknowledged_change() {
    run(Scenario::redis_kill()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_stop_reading_catch_up_or_reset_and_converge() {
    run(Scenario::slow_consumers()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_every_consumer_at_once_converges() {
    run(Scenario::reconnect_storm()).await;
}
