//! Propagation, driven without any transport: who holds a revision, who failed and why, who
//! is pending, and waiting for it.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use super::*;
use crate::store::MemoryStore;

async fn core_with(config: CoreConfig) -> Arc<Core> {
    Core::open(Arc::new(MemoryStore::new(100)), config)
        .await
        .unwrap()
}

fn w(name: &str) -> WorkerName {
    WorkerName::parse(name).unwrap()
}

fn consumer(id: &str) -> ConsumerId {
    ConsumerId::authorize(id.split('/').next().unwrap(), id).unwrap()
}

fn subscribe(core: &Core, id: &str, filter: &[&str]) -> Subscription {
    core.subscribe(SubscribeParams {
        consumer_id: consumer(id),
        filter: WorkerFilter::parse(filter).unwrap(),
        resume: None,
        transport: "test",
        remote: None,
    })
    .unwrap()
}

async fn put(core: &Core, worker: &str, version: &str) -> Revision {
    core.publish(
        w(worker),
        Version::parse(version).unwrap(),
        Bytes::from(format!("{worker}@{version}")),
        None,
    )
    .await
    .unwrap()
    .revision
}

async fn ack(core: &Core, id: &str, worker: &str, revision: Revision, error: Option<&str>) {
    core.ack(
        Ack {
            consumer_id: consumer(id),
            worker: w(worker),
            revision,
            applied: error.is_none(),
            error: error.unwrap_or_default().to_owned(),
        },
        "test",
    )
    .await
    .unwrap();
}

fn ids<T>(items: &[T], id: impl Fn(&T) -> &ConsumerId) -> Vec<String> {
    items.iter().map(|i| id(i).to_string()).collect()
}

#[tokio::test]
async fn acked_failed_and_pending_are_told_apart_per_consumer() {
    let core = core_with(CoreConfig::default()).await;
    let _a = subscribe(&core, "edge/a", &[]);
    let _b = subscribe(&core, "edge/b", &["app"]);
    let _c = subscribe(&core, "edge/c", &["app", "other"]);
    let _d = subscribe(&core, "edge/d", &["other"]);
    let revision = put(&core, "app", "1").await;

    let now = core.propagation(&w("app"), revision, Duration::ZERO).await;
    assert_eq!(now.subscribers, 3, "edge/d does not follow app");
    assert_eq!(now.state, PropagationState::Pending);
    assert_eq!(
        ids(&now.pending, |p| &p.consumer_id),
        ["edge/a", "edge/b", "edge/c"]
    );

    ack(&core, "edge/a", "app", revision, None).await;
    ack(&core, "edge/b", "app", revision, None).await;
    ack(&core, "edge/c", "app", revision, Some("syntax error")).await;
    let done = core.propagation(&w("app"), revision, Duration::ZERO).await;
    assert_eq!(done.state, PropagationState::Failed);
    assert_eq!(ids(&done.acked, |a| &a.consumer_id), ["edge/a", "edge/b"]);
    assert!(done.acked.iter().all(|a| a.latency_ms.is_some()));
    assert_eq!(done.failed.len(), 1);
    assert_eq!(done.failed[0].consumer_id.as_str(), "edge/c");
    assert_eq!(done.failed[0].reason, "syntax error");
    assert!(done.pending.is_empty());

    let status = core.worker_status(&w("app")).unwrap();
    assert_eq!(status.version.as_str(), "1");
    assert_eq!(status.propagation, done);
    let listed = core.workers_status();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].propagation, done);
    assert_eq!(
        listed[0].clone().summarized().propagation,
        PropagationSummary {
            revision,
            state: PropagationState::Failed,
            subscribers: 3,
            acked: 2,
            pending: 0,
            failed: 1
        }
    );
    core.shutdown().await;
}

#[tokio::test]
async fn a_later_revision_counts_and_a_newer_success_clears_a_failure() {
    let core = core_with(CoreConfig::default()).await;
    let _a = subscribe(&core, "edge/a", &[]);
    let first = put(&core, "app", "1").await;
    ack(&core, "edge/a", "app", first, Some("syntax error")).await;
    let second = put(&core, "app", "2").await;
    // The old failure says nothing about the new revision.
    let now = core.propagation(&w("app"), second, Duration::ZERO).await;
    assert_eq!(now.state, PropagationState::Pending);
    ack(&core, "edge/a", "app", second, None).await;
    for revision in [first, second] {
        let p = core.propagation(&w("app"), revision, Duration::ZERO).await;
        assert_eq!(p.state, PropagationState::Complete, "revision {revision}");
        assert_eq!(p.acked[0].revision, second);
    }
    // A late failure report about the older revision changes nothing.
    ack(&core, "edge/a", "app", first, Some("late")).await;
    let p = core.propagation(&w("app"), second, Duration::ZERO).await;
    assert_eq!(p.state, PropagationState::Complete);
    core.shutdown().await;
}

#[tokio::test]
async fn acks_beyond_the_head_or_from_strangers_are_not_tracked() {
    let core = core_with(CoreConfig::default()).await;
    let _a = subscribe(&core, "edge/a", &[]);
    let revision = put(&core, "app", "1").await;
    ack(&core, "edge/a", "app", revision + 100, None).await;
    ack(&core, "edge/zz", "app", revision, None).await;
    let p = core.propagation(&w("app"), revision, Duration::ZERO).await;
    assert_eq!(p.subscribers, 1);
    assert_eq!(ids(&p.pending, |p| &p.consumer_id), ["edge/a"]);
    core.shutdown().await;
}

#[tokio::test]
async fn waiting_ends_when_the_last_subscriber_answers() {
    let core = core_with(CoreConfig::default()).await;
    let _a = subscribe(&core, "edge/a", &[]);
    let _b = subscribe(&core, "edge/b", &[]);
    let revision = put(&core, "app", "1").await;
    let started = std::time::Instant::now();
    let waiter = {
        let core = core.clone();
        tokio::spawn(async move {
            core.propagation(&w("app"), revision, Duration::from_secs(30))
                .await
        })
    };
    ack(&core, "edge/a", "app", revision, None).await;
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "answered before edge/b did");
    ack(&core, "edge/b", "app", revision, Some("no")).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the wait ends on the last answer")
        .unwrap();
    assert_eq!(answer.acked.len(), 1);
    assert_eq!(answer.failed.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    core.shutdown().await;
}

#[tokio::test]
async fn waiting_ends_at_the_deadline_with_whoever_is_pending() {
    let core = core_with(CoreConfig::default()).await;
    let _a = subscribe(&core, "edge/a", &[]);
    let revision = put(&core, "app", "1").await;
    let started = std::time::Instant::now();
    let p = core
        .propagation(&w("app"), revision, Duration::from_millis(100))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(p.state, PropagationState::Pending);
    assert!(p.pending[0].connected);
    core.shutdown().await;
}

#[tokio::test]
async fn a_departed_consumer_is_pending_until_it_resumes_and_acks() {
    let core = core_with(CoreConfig::default()).await;
    let mut a = subscribe(&core, "edge/a", &["app"]);
    let first = put(&core, "app", "1").await;
    while a
        .info()
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed)
        < first
    {
        a.next().await.unwrap();
    }
    ack(&core, "edge/a", "app", first, None).await;
    drop(a);
    assert!(core.subscribers().is_empty());

    let second = put(&core, "app", "2").await;
    let p = core.propagation(&w("app"), second, Duration::ZERO).await;
    assert_eq!(p.subscribers, 1);
    assert_eq!(ids(&p.pending, |p| &p.consumer_id), ["edge/a"]);
    assert!(!p.pending[0].connected && !p.pending[0].delivered);
    let consumers = core.consumers_status();
    assert_eq!(consumers.len(), 1);
    assert!(!consumers[0].connected);
    assert_eq!((consumers[0].acked_revision, consumers[0].lag), (first, 1));

    let _again = subscribe(&core, "edge/a", &["app"]);
    ack(&core, "edge/a", "app", second, None).await;
    let p = core.propagation(&w("app"), second, Duration::ZERO).await;
    assert_eq!(p.state, PropagationState::Complete);
    assert_eq!(ids(&p.acked, |a| &a.consumer_id), ["edge/a"]);
    let consumers = core.consumers_status();
    assert_eq!(consumers.len(), 1);
    assert!(consumers[0].connected);
    assert_eq!((consumers[0].acked_revision, consumers[0].lag), (second, 0));
    core.shutdown().await;
}

#[tokio::test]
async fn a_departed_consumer_is_forgotten_after_the_grace() {
    let core = core_with(CoreConfig {
        remember_departed: Duration::ZERO,
        ..CoreConfig::default()
    })
    .await;
    drop(subscribe(&core, "edge/a", &[]));
    let revision = put(&core, "app", "1").await;
    let p = core.propagation(&w("app"), revision, Duration::ZERO).await;
    assert_eq!((p.subscribers, p.state), (0, PropagationState::Complete));
    assert!(core.consumers_status().is_empty());
    core.shutdown().await;
}

#[tokio::test]
async fn consumers_status_shows_lag_and_failures() {
    let core = core_with(CoreConfig::default()).await;
    let _a = subscribe(&core, "edge/a", &["x", "y"]);
    let x = put(&core, "x", "1").await;
    let y = put(&core, "y", "1").await;
    put(&core, "z", "1").await;
    ack(&core, "edge/a", "x", x, None).await;
    ack(&core, "edge/a", "y", y, Some("boom")).await;
    let consumers = core.consumers_status();
    let a = &consumers[0];
    assert_eq!(a.consumer_id.as_str(), "edge/a");
    assert_eq!(a.workers, Some(vec![w("x"), w("y")]));
    assert_eq!((a.acked_revision, a.lag), (x, 1));
    assert_eq!(a.failures.len(), 1);
    assert_eq!(
        (a.failures[0].worker.as_str(), a.failures[0].reason.as_str()),
        ("y", "boom")
    );
    core.shutdown().await;
}

#[tokio::test]
async fn changes_are_announced_on_publish_subscribe_and_ack() {
    let core = core_with(CoreConfig::default()).await;
    let mut changes = core.watch_changes();
    changes.borrow_and_update();
    let sub = subscribe(&core, "edge/a", &[]);
    assert!(changes.has_changed().unwrap(), "subscribe");
    changes.borrow_and_update();
    let revision = put(&core, "app", "1").await;
    assert!(changes.has_changed().unwrap(), "publish");
    changes.borrow_and_update();
    ack(&core, "edge/a", "app", revision, None).await;
    assert!(changes.has_changed().unwrap(), "ack");
    changes.borrow_and_update();
    drop(sub);
    assert!(changes.has_changed().unwrap(), "unsubscribe");
    core.shutdown().await;
}

#[tokio::test]
async fn a_consumer_with_two_subscriptions_counts_once_and_stays_while_one_is_live() {
    let core = core_with(CoreConfig {
        remember_departed: Duration::ZERO,
        ..CoreConfig::default()
    })
    .await;
    let first = subscribe(&core, "edge/a", &[]);
    let _second = subscribe(&core, "edge/a", &["app"]);
    let revision = put(&core, "app", "1").await;
    let p = core.propagation(&w("app"), revision, Duration::ZERO).await;
    assert_eq!(p.subscribers, 1);
    drop(first);
    ack(&core, "edge/a", "app", revision, None).await;
    let p = core.propagation(&w("app"), revision, Duration::ZERO).await;
    assert_eq!((p.subscribers, p.state), (1, PropagationState::Complete));
    assert!(p.acked.iter().all(|a| a.consumer_id.as_str() == "edge/a"));
    core.shutdown().await;
}
