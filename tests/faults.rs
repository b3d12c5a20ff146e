//! The fault suite: each scenario runs the real binary, consumers over gRPC and QUIC, the
//! publisher and one fault, records every event and checks the delivery promises (see
//! `workerpush::faults`). Short variants; `examples/fault_harness.rs` runs long ones.
//!
//! Each run prints `seed=<n>`; `FAULT_SEED=<n> cargo test --test faults <scenario>` replays it.
//! Scenarios run one at a time (a lock), so that they do not starve each other on a small
//! machine and their timings mean something.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use workerpush::{
    client::{Consumer, ConsumerOptions, QuicTransport},
    faults::{
        process::CoreProcess,
        publish::{Action, HookClient, Publisher, Step},
        record::{self, Pause, Recorder, SharedLog},
        scenario::{self, Scenario, Setup},
        seed_from_env,
    },
    tls::{self, ClientTlsPurpose},
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
async fn redis_flushed_then_failed_over_to_its_replica_mid_run_loses_no_acknowledged_change() {
    run(Scenario::redis_loss()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_stop_reading_catch_up_or_reset_and_converge() {
    run(Scenario::slow_consumers()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_every_consumer_at_once_converges() {
    run(Scenario::reconnect_storm()).await;
}

/// After `kill -9` and a restart on the same port, a QUIC consumer's old connection is dead,
/// but nothing tells it so (UDP has no RST) unless the new process answers its next packet
/// with a stateless reset the client believes. Without that (before the fix: another reset
/// key, and packets with the old connection IDs dropped unanswered) the consumer waited out
/// the 30 s idle timeout and the backoff: 30–40 s. Now it learns at its next packet, at the
/// latest its keep-alive (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_consumer_notices_a_core_restarted_after_kill_9_at_its_next_keep_alive() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_workerpush"));
    let mut core = CoreProcess::start(&bin, dir.path(), &[]).await.unwrap();
    let certs = core.certs();
    tls::install_crypto_provider();
    let quic_tls = tls::client_config(
        &certs.join("ca.pem"),
        &certs.join("clients/consumer-1.pem"),
        &certs.join("clients/consumer-1-key.pem"),
        ClientTlsPurpose::Quic,
    )
    .unwrap();
    let transport =
        QuicTransport::new(&format!("127.0.0.1:{}", core.addrs().quic.port()), quic_tls).unwrap();
    let log = SharedLog::default();
    let mut recorder = Recorder::new(log.clone(), Pause::default());
    let stop = CancellationToken::new();
    let consumer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut consumer = Consumer::new(transport, ConsumerOptions::default(), None);
            consumer.run(&mut recorder, stop).await
        }
    });
    let held = |revision: u64| {
        let log = log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            while record::lock(&log)
                .position
                .as_ref()
                .is_none_or(|p| p.revision < revision)
            {
                assert!(
                    Instant::now() < deadline,
                    "never held revision {revision}: {:?}",
                    record::lock(&log).events
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    held(0).await;

    core.kill9().await;
    core.restart().await.unwrap();
    let restarted = Instant::now();
    let publisher = Publisher::new(
        HookClient::new(core.addrs().http, &core.hook_secret().unwrap()).unwrap(),
        Duration::from_secs(30),
    );
    let step = Step {
        worker: "after-restart".into(),
        action: Action::Put {
            version: "1".into(),
            code: bytes::Bytes::from_static(b"export default {}"),
        },
    };
    let revision = publisher.apply(1, &step).await.unwrap().revision;
    held(revision).await;
    let took = restarted.elapsed();
    println!("QUIC consumer held the first change after the restart {took:.2?} later");
    stop.cancel();
    consumer.await.unwrap().unwrap();
    assert!(
        took < Duration::from_secs(15),
        "the QUIC consumer took {took:?} to notice the restart"
    );
}
