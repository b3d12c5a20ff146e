//! Delivery semantics of the core, driven without any transport.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use super::*;
use crate::{
    pb::{UpdateKind, WorkerUpdate},
    store::MemoryStore,
};

async fn core_with(config: CoreConfig) -> Arc<Core> {
    Core::open(Arc::new(MemoryStore::new(config.retain_changes)), config)
        .await
        .unwrap()
}

async fn core() -> Arc<Core> {
    core_with(CoreConfig::default()).await
}

fn w(name: &str) -> WorkerName {
    WorkerName::parse(name).unwrap()
}

async fn put(core: &Core, worker: &str, version: &str, code: &str) -> Published {
    core.publish(
        w(worker),
        Version::parse(version).unwrap(),
        Bytes::from(code.to_owned()),
        None,
    )
    .await
    .unwrap()
}

fn params(filter: &[&str], resume: Option<(String, Revision)>) -> SubscribeParams {
    SubscribeParams {
        consumer_id: ConsumerId::authorize("edge", "").unwrap(),
        filter: WorkerFilter::parse(filter).unwrap(),
        resume,
        transport: "test",
        remote: None,
    }
}

async fn next(sub: &mut Subscription) -> WorkerUpdate {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("an update within 5 s")
        .unwrap()
        .decode()
        .unwrap()
}

fn kind(update: &WorkerUpdate) -> UpdateKind {
    UpdateKind::try_from(update.kind).unwrap()
}

/// Reads updates until SYNCED, returning those before it and the SYNCED revision.
async fn until_synced(sub: &mut Subscription) -> (Vec<WorkerUpdate>, Revision) {
    let mut updates = Vec::new();
    loop {
        let update = next(sub).await;
        if kind(&update) == UpdateKind::Synced {
            return (updates, update.revision);
        }
        updates.push(update);
    }
}

#[tokio::test]
async fn fresh_subscriber_gets_reset_snapshot_synced_then_live() {
    let core = core().await;
    put(&core, "a", "1", "a1").await;
    put(&core, "b", "1", "b1").await;
    put(&core, "a", "2", "a2").await;
    let mut sub = core.subscribe(params(&[], None)).unwrap();
    let (updates, synced) = until_synced(&mut sub).await;
    assert_eq!(kind(&updates[0]), UpdateKind::Reset);
    let snapshot: Vec<_> = updates[1..]
        .iter()
        .map(|u| (u.worker_name.as_str(), u.version.as_str(), u.revision))
        .collect();
    assert_eq!(snapshot, [("b", "1", 2), ("a", "2", 3)]);
    assert_eq!(synced, 3);
    assert_eq!(updates[2].worker_code, Bytes::from("a2"));
    assert_eq!(updates[2].checksum, Checksum::of(b"a2").as_str());
    assert!(updates.iter().all(|u| u.epoch == core.epoch().as_str()));

    put(&core, "c", "1", "c1").await;
    let live = next(&mut sub).await;
    assert_eq!(
        (kind(&live), live.revision, live.worker_name.as_str()),
        (UpdateKind::Put, 4, "c")
    );
}

#[tokio::test]
async fn filtered_subscriber_sees_only_its_workers() {
    let core = core().await;
    let mut all = core.subscribe(params(&[], None)).unwrap();
    let mut only_a = core.subscribe(params(&["a"], None)).unwrap();
    until_synced(&mut all).await;
    until_synced(&mut only_a).await;
    put(&core, "b", "1", "b").await;
    put(&core, "a", "1", "a").await;
    core.delete(w("b")).await.unwrap();
    put(&core, "a", "2", "a2").await;
    let seen: Vec<_> = [
        next(&mut all).await,
        next(&mut all).await,
        next(&mut all).await,
        next(&mut all).await,
    ]
    .iter()
    .map(|u| (kind(u), u.worker_name.clone(), u.revision))
    .collect();
    assert_eq!(
        seen,
        [
            (UpdateKind::Put, "b".into(), 1),
            (UpdateKind::Put, "a".into(), 2),
            (UpdateKind::Delete, "b".into(), 3),
            (UpdateKind::Put, "a".into(), 4)
        ]
    );
    let first = next(&mut only_a).await;
    let second = next(&mut only_a).await;
    assert_eq!((first.worker_name.as_str(), first.revision), ("a", 2));
    assert_eq!((second.worker_name.as_str(), second.revision), ("a", 4));
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_changes_then_synced() {
    let core = core().await;
    put(&core, "a", "1", "a1").await;
    let epoch = core.epoch().to_string();
    let resume_at = core.head();
    for i in 2..=6 {
        put(&core, "a", &i.to_string(), &format!("a{i}")).await;
    }
    let mut sub = core
        .subscribe(params(&[], Some((epoch, resume_at))))
        .unwrap();
    assert_eq!(sub.start(), Start::Replay);
    let (updates, synced) = until_synced(&mut sub).await;
    let revisions: Vec<_> = updates.iter().map(|u| u.revision).collect();
    assert_eq!(revisions, [2, 3, 4, 5, 6]);
    assert_eq!(synced, 6);
    assert!(updates.iter().all(|u| kind(u) == UpdateKind::Put));
}

#[tokio::test]
async fn wrong_epoch_or_trimmed_revision_resets() {
    let config = CoreConfig {
        retain_changes: 3,
        ..CoreConfig::default()
    };
    let core = core_with(config).await;
    for i in 1..=6 {
        put(&core, &format!("w{i}"), "1", "x").await;
    }
    core.delete(w("w1")).await.unwrap();
    for resume in [("other-epoch".to_owned(), 5), (core.epoch().to_string(), 1)] {
        let mut sub = core.subscribe(params(&[], Some(resume))).unwrap();
        assert_eq!(sub.start(), Start::Reset);
        let (updates, synced) = until_synced(&mut sub).await;
        assert_eq!(kind(&updates[0]), UpdateKind::Reset);
        let names: Vec<_> = updates[1..]
            .iter()
            .map(|u| u.worker_name.as_str())
            .collect();
        assert_eq!(names, ["w2", "w3", "w4", "w5", "w6"]);
        assert_eq!(synced, 7);
    }
}

#[tokio::test]
async fn deleted_worker_disappears_for_a_consumer_that_was_offline() {
    let core = core().await;
    put(&core, "a", "1", "a").await;
    put(&core, "b", "1", "b").await;
    let epoch = core.epoch().to_string();
    let offline_at = core.head();
    core.delete(w("a")).await.unwrap();
    let mut sub = core
        .subscribe(params(&[], Some((epoch, offline_at))))
        .unwrap();
    let (updates, _) = until_synced(&mut sub).await;
    assert_eq!(updates.len(), 1);
    assert_eq!(
        (
            kind(&updates[0]),
            updates[0].worker_name.as_str(),
            updates[0].version.as_str()
        ),
        (UpdateKind::Delete, "a", "1")
    );
}

#[tokio::test]
async fn stalled_subscriber_catches_up_to_exact_state_without_slowing_others() {
    let config = CoreConfig {
        retain_changes: 1000,
        ..CoreConfig::default()
    };
    let core = core_with(config).await;
    let mut stalled = core.subscribe(params(&[], None)).unwrap();
    let mut live = core.subscribe(params(&[], None)).unwrap();
    until_synced(&mut stalled).await;
    until_synced(&mut live).await;
    let reader = tokio::spawn(async move {
        let mut last = 0;
        while last < 5000 {
            let update = next(&mut live).await;
            assert_eq!(
                update.revision,
                last + 1,
                "live reader sees every change in order"
            );
            last = update.revision;
        }
    });
    for i in 0..5000 {
        put(
            &core,
            &format!("w{}", i % 50),
            &i.to_string(),
            &i.to_string(),
        )
        .await;
    }
    reader.await.unwrap();
    // The stalled reader fell out of the 1,000-change log: RESET, then exactly the latest state.
    let (updates, synced) = until_synced(&mut stalled).await;
    assert_eq!(kind(&updates[0]), UpdateKind::Reset);
    assert_eq!(synced, 5000);
    let state: std::collections::BTreeMap<_, _> = updates[1..]
        .iter()
        .map(|u| (u.worker_name.clone(), u.version.clone()))
        .collect();
    let expected: std::collections::BTreeMap<_, _> = core
        .list(&WorkerFilter::all())
        .workers
        .into_iter()
        .map(|u| (u.worker_name, u.version))
        .collect();
    assert_eq!(state.len(), 50);
    assert_eq!(state, expected);
}

#[tokio::test(start_paused = true)]
async fn progress_synced_while_filtered_changes_go_by() {
    let config = CoreConfig {
        progress_interval: Duration::from_secs(30),
        ..CoreConfig::default()
    };
    let core = core_with(config).await;
    let mut sub = core.subscribe(params(&["a"], None)).unwrap();
    until_synced(&mut sub).await;
    put(&core, "b", "1", "b").await;
    put(&core, "b", "2", "b2").await;
    let started = tokio::time::Instant::now();
    let synced = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .expect("a progress marker within 60 s")
        .unwrap()
        .decode()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "not before the interval"
    );
    assert_eq!((kind(&synced), synced.revision), (UpdateKind::Synced, 2));
}

#[tokio::test]
async fn republishing_same_version_is_a_noop_and_other_code_conflicts() {
    let core = core().await;
    let first = put(&core, "a", "1", "x").await;
    assert!(first.created);
    let again = put(&core, "a", "1", "x").await;
    assert_eq!((again.revision, again.created), (first.revision, false));
    let conflict = core
        .publish(w("a"), Version::parse("1").unwrap(), Bytes::from("y"), None)
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), ErrorCode::AlreadyExists);
    let mismatch = core
        .publish(
            w("a"),
            Version::parse("2").unwrap(),
            Bytes::from("y"),
            Some(Checksum::of(b"z")),
        )
        .await
        .unwrap_err();
    assert_eq!(mismatch.code(), ErrorCode::InvalidArgument);
    assert_eq!(
        core.delete(w("zz")).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    assert_eq!(core.head(), 1);
}

#[tokio::test]
async fn large_code_is_not_inline_but_fetchable() {
    let config = CoreConfig {
        inline_max_bytes: 1024,
        ..CoreConfig::default()
    };
    let core = core_with(config).await;
    let code = "x".repeat(4096);
    put(&core, "big", "1", &code).await;
    let mut sub = core.subscribe(params(&[], None)).unwrap();
    let (updates, _) = until_synced(&mut sub).await;
    assert!(updates[1].worker_code.is_empty());
    assert_eq!(updates[1].size, 4096);
    let bundle = core.fetch(&w("big"), None).await.unwrap();
    assert_eq!(bundle.code, Bytes::from(code));
    assert_eq!(
        core.fetch(&w("nope"), None).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn shutdown_ends_subscriptions() {
    let core = core().await;
    let mut sub = core.subscribe(params(&[], None)).unwrap();
    until_synced(&mut sub).await;
    let shutdown = {
        let core = core.clone();
        tokio::spawn(async move { core.shutdown().await })
    };
    assert_eq!(sub.next().await.unwrap_err(), Ended::ShuttingDown);
    shutdown.await.unwrap();
    assert_eq!(
        core.subscribe(params(&[], None)).err().map(|e| e.code()),
        Some(ErrorCode::Unavailable)
    );
}

#[tokio::test]
async fn resume_from_a_revision_this_core_has_not_read_yet_waits_and_replays() {
    let core = core().await;
    put(&core, "a", "1", "a1").await;
    let epoch = core.epoch().to_string();
    // A client learned revision 2 elsewhere; this core is at 1. Answering must not wait.
    let mut sub = core.subscribe(params(&[], Some((epoch, 2)))).unwrap();
    let reader = tokio::spawn(async move { until_synced(&mut sub).await });
    put(&core, "b", "1", "b1").await;
    let (updates, synced) = reader.await.unwrap();
    assert!(updates.is_empty(), "nothing after 2 to replay: {updates:?}");
    assert_eq!(synced, 2);
}

#[tokio::test(start_paused = true)]
async fn resume_from_a_revision_that_never_comes_resets_after_the_wait() {
    let core = core().await;
    put(&core, "a", "1", "a1").await;
    let epoch = core.epoch().to_string();
    let mut sub = core.subscribe(params(&[], Some((epoch, 99)))).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("decided within the wait")
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(kind(&first), UpdateKind::Reset);
    let (updates, synced) = until_synced(&mut sub).await;
    assert_eq!((updates.len(), synced), (1, 1));
}
