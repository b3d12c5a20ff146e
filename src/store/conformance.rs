//! The store conformance suite: one set of behaviours every [`Store`] must show. Each engine's
//! tests call [`run_all`] with a factory that makes a fresh, empty store (a new temp dir, a
//! new Redis key prefix); persistent engines also call [`survives_reopen`].
//!
//! Public (not `cfg(test)`) so integration tests and every engine's tests share it.

use std::{collections::BTreeMap, future::Future, sync::Arc};

use bytes::Bytes;

use super::{ChangeKind, ConsumerRecord, Outcome, Proposal, Store, Tail};
use crate::core::types::{Checksum, ConsumerId, Version, WorkerName};

/// Runs every check against fresh stores from `make`. Panics (it is a test) on a failure.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    starts_empty_with_an_epoch(&make().await).await;
    assigns_contiguous_revisions(&make().await).await;
    keeps_versions_immutable(&make().await).await;
    deletes_and_restores(&make().await).await;
    stores_bundles_by_checksum(&make().await).await;
    reads_changes_after_a_revision(&make().await).await;
    serialises_concurrent_applies(Arc::new(make().await)).await;
    hints_at_new_heads(&make().await).await;
    keeps_consumer_records(&make().await).await;
    tells_its_head(&make().await).await;
    claims_each_request_once(&make().await).await;
    removes_a_consumer_record(&make().await).await;
    records_the_deployer(&make().await).await;
}

async fn records_the_deployer(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    let first = match apply(store, put_by("a", "1", b"a1", "team-shop")).await {
        Outcome::Committed(change) => change,
        other => panic!("expected a commit, got {other:?}"),
    };
    assert_eq!(
        &*first.deployer, "team-shop",
        "the committed change says who"
    );
    match apply(store, put_by("a", "1", b"a1", "someone-else")).await {
        Outcome::Unchanged(change) => assert_eq!(
            &*change.deployer, "team-shop",
            "a no-op republish keeps the deployer of the change that made it latest"
        ),
        other => panic!("same version and code must be a no-op, got {other:?}"),
    }
    committed(store, put("b", "1", b"b1")).await;
    committed(store, delete_by("b", "ops")).await;
    let state = store.load().await.unwrap_or_else(|e| panic!("{e}"));
    let deployers: Vec<_> = state.tail.iter().map(|c| &*c.deployer).collect();
    assert_eq!(
        deployers,
        ["team-shop", "", "ops"],
        "the log keeps each deployer"
    );
    assert_eq!(state.latest.len(), 1);
    assert_eq!(
        &*state.latest[0].deployer, "team-shop",
        "so does the latest"
    );
}

async fn tells_its_head(store: &impl Store) {
    let state = store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store.head().await.unwrap_or_else(|e| panic!("{e}")),
        (state.epoch.clone(), 0)
    );
    committed(store, put("a", "1", b"a1")).await;
    committed(store, put("b", "1", b"b1")).await;
    assert_eq!(
        store.head().await.unwrap_or_else(|e| panic!("{e}")),
        (state.epoch, 2)
    );
}

async fn claims_each_request_once(store: &impl Store) {
    let key = format!("{:064x}", rand::random::<u128>());
    let other = format!("{:064x}", rand::random::<u128>());
    let until = crate::core::now_ms() / 1000 + 60;
    let claim = |key: &str| {
        let key = key.to_owned();
        async move {
            store
                .claim_request(&key, until)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert!(claim(&key).await, "a new request");
    assert!(!claim(&key).await, "the same request again");
    assert!(claim(&other).await, "another request");
    let expired = format!("{:064x}", rand::random::<u128>());
    let past = crate::core::now_ms() / 1000 - 1;
    assert!(
        store
            .claim_request(&expired, past)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(
        store
            .claim_request(&expired, until)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        "a claim whose window ended is free again"
    );
}

fn name(n: &str) -> WorkerName {
    WorkerName::parse(n).unwrap_or_else(|e| panic!("{e}"))
}

fn version(v: &str) -> Version {
    Version::parse(v).unwrap_or_else(|e| panic!("{e}"))
}

/// A put proposal for `code`.
pub fn put(worker: &str, ver: &str, code: &[u8]) -> Proposal {
    Proposal::Put {
        worker: name(worker),
        version: version(ver),
        checksum: Checksum::of(code),
        size: code.len() as u64,
        deployer: "".into(),
    }
}

/// A put proposal for `code` asked for by `deployer`.
fn put_by(worker: &str, ver: &str, code: &[u8], deployer: &str) -> Proposal {
    match put(worker, ver, code) {
        Proposal::Put {
            worker,
            version,
            checksum,
            size,
            ..
        } => Proposal::Put {
            worker,
            version,
            checksum,
            size,
            deployer: deployer.into(),
        },
        delete => delete,
    }
}

fn delete(worker: &str) -> Proposal {
    delete_by(worker, "")
}

fn delete_by(worker: &str, deployer: &str) -> Proposal {
    Proposal::Delete {
        worker: name(worker),
        deployer: deployer.into(),
    }
}

async fn apply(store: &impl Store, proposal: Proposal) -> Outcome {
    store
        .apply(proposal, 1_700_000_000_000)
        .await
        .unwrap_or_else(|e| panic!("apply failed: {e}"))
}

async fn committed(store: &impl Store, proposal: Proposal) -> u64 {
    match apply(store, proposal).await {
        Outcome::Committed(change) => change.revision,
        other => panic!("expected a commit, got {other:?}"),
    }
}

async fn starts_empty_with_an_epoch(store: &impl Store) {
    let state = store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.head, 0);
    assert!(state.latest.is_empty() && state.tail.is_empty());
    assert!(!state.epoch.as_str().is_empty());
    let again = store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.epoch, state.epoch, "epoch is stable");
}

async fn assigns_contiguous_revisions(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(committed(store, put("a", "1", b"a1")).await, 1);
    assert_eq!(committed(store, put("b", "1", b"b1")).await, 2);
    assert_eq!(committed(store, put("a", "2", b"a2")).await, 3);
    let state = store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.head, 3);
    let latest: Vec<_> = state
        .latest
        .iter()
        .map(|c| {
            (
                c.worker.as_str().to_owned(),
                c.version.as_str().to_owned(),
                c.revision,
            )
        })
        .collect();
    assert_eq!(
        latest,
        [("b".into(), "1".into(), 2), ("a".into(), "2".into(), 3)],
        "latest per worker, ascending revision"
    );
    let revisions: Vec<_> = state.tail.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, [1, 2, 3]);
    let change = &state.tail[2];
    assert_eq!(change.checksum, Checksum::of(b"a2"));
    assert_eq!(change.size, 2);
    assert_eq!(change.timestamp_ms, 1_700_000_000_000);
}

async fn keeps_versions_immutable(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(committed(store, put("a", "1", b"one")).await, 1);
    match apply(store, put("a", "1", b"one")).await {
        Outcome::Unchanged(change) => assert_eq!(change.revision, 1),
        other => panic!("same version and code must be a no-op, got {other:?}"),
    }
    match apply(store, put("a", "1", b"other")).await {
        Outcome::Conflict { existing } => assert_eq!(existing, Checksum::of(b"one")),
        other => panic!("same version with other code must conflict, got {other:?}"),
    }
    assert_eq!(committed(store, put("a", "2", b"two")).await, 2);
    assert_eq!(
        committed(store, put("a", "1", b"one")).await,
        3,
        "re-publishing an older version is a rollback: a new change"
    );
    assert_eq!(store.load().await.map(|s| s.head).ok(), Some(3));
}

async fn deletes_and_restores(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(apply(store, delete("a")).await, Outcome::NotFound);
    committed(store, put("a", "1", b"one")).await;
    match apply(store, delete("a")).await {
        Outcome::Committed(change) => {
            assert_eq!(change.kind, ChangeKind::Delete);
            assert_eq!(change.revision, 2);
            assert_eq!(
                change.version.as_str(),
                "1",
                "a delete names the version it removed"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(apply(store, delete("a")).await, Outcome::NotFound);
    assert!(
        store
            .load()
            .await
            .map(|s| s.latest.is_empty())
            .unwrap_or(false)
    );
    assert!(
        matches!(
            apply(store, put("a", "1", b"changed")).await,
            Outcome::Conflict { .. }
        ),
        "immutable after delete"
    );
    assert_eq!(
        committed(store, put("a", "1", b"one")).await,
        3,
        "restoring after delete is a new change"
    );
}

async fn stores_bundles_by_checksum(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    let code = Bytes::from(vec![7u8; 3 << 20]);
    let checksum = Checksum::of(&code);
    assert_eq!(store.bundle(&checksum).await.ok(), Some(None));
    store
        .put_bundle(&checksum, code.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .put_bundle(&checksum, code.clone())
        .await
        .unwrap_or_else(|e| panic!("idempotent: {e}"));
    assert_eq!(store.bundle(&checksum).await.ok().flatten(), Some(code));
}

async fn reads_changes_after_a_revision(store: &impl Store) {
    let epoch = store.load().await.unwrap_or_else(|e| panic!("{e}")).epoch;
    for i in 0..5 {
        committed(store, put("a", &i.to_string(), i.to_string().as_bytes())).await;
    }
    match store
        .changes_after(2, 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    {
        Tail::Changes { epoch: e, changes } => {
            assert_eq!(e, epoch);
            assert_eq!(
                changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
                [3, 4]
            );
        }
        Tail::Gone { .. } => panic!("revision 3 is retained"),
    }
    match store
        .changes_after(5, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    {
        Tail::Changes { changes, .. } => assert!(changes.is_empty()),
        Tail::Gone { .. } => panic!("the head itself is a valid position"),
    }
    assert!(
        matches!(
            store
                .changes_after(9, 10)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            Tail::Gone { .. }
        ),
        "a position past the head is unknown"
    );
}

async fn serialises_concurrent_applies(store: Arc<impl Store>) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let worker = format!("w{}", i % 8);
            let code = format!("code-{i}");
            store
                .apply(put(&worker, &i.to_string(), code.as_bytes()), 1)
                .await
                .map_err(|e| e.to_string())
        }));
    }
    let mut revisions = Vec::new();
    for task in tasks {
        match task.await.unwrap_or_else(|e| panic!("{e}")) {
            Ok(Outcome::Committed(change)) => revisions.push(change.revision),
            other => panic!("{other:?}"),
        }
    }
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (1..=64).collect::<Vec<_>>(),
        "one gap-free order"
    );
    let state = store.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.head, 64);
    assert_eq!(state.latest.len(), 8);
}

async fn hints_at_new_heads(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    let mut hint = store.head_hint();
    hint.borrow_and_update();
    committed(store, put("a", "1", b"x")).await;
    tokio::time::timeout(std::time::Duration::from_secs(5), hint.changed())
        .await
        .unwrap_or_else(|_| panic!("no hint within 5 s of a commit"))
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn keeps_consumer_records(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    let mut record = ConsumerRecord {
        id: ConsumerId::authorize("edge-1", "edge-1/a").unwrap_or_else(|e| panic!("{e}")),
        endpoint: "10.0.0.1:9000".to_owned(),
        labels: BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
        transport: "grpc".to_owned(),
        first_seen_ms: 1,
        last_seen_ms: 2,
        last_acked_revision: 0,
    };
    store
        .save_consumer(&record)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    record.last_acked_revision = 9;
    record.last_seen_ms = 3;
    store
        .save_consumer(&record)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.consumers().await.ok(), Some(vec![record.clone()]));

    // An ack-only save (no endpoint, labels or transport) and a stale one merge, never
    // overwrite: the registration and the higher acknowledged revision stay.
    let ack_only = ConsumerRecord {
        endpoint: String::new(),
        labels: BTreeMap::new(),
        transport: String::new(),
        first_seen_ms: 5,
        last_seen_ms: 4,
        last_acked_revision: 7,
        ..record.clone()
    };
    store
        .save_consumer(&ack_only)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    record.last_seen_ms = 4;
    assert_eq!(store.consumers().await.ok(), Some(vec![record]));
}

async fn removes_a_consumer_record(store: &impl Store) {
    store.load().await.unwrap_or_else(|e| panic!("{e}"));
    let record = |suffix: &str| ConsumerRecord {
        id: ConsumerId::authorize("edge-1", &format!("edge-1/{suffix}"))
            .unwrap_or_else(|e| panic!("{e}")),
        endpoint: "10.0.0.1:9000".to_owned(),
        labels: BTreeMap::new(),
        transport: "quic".to_owned(),
        first_seen_ms: 1,
        last_seen_ms: 2,
        last_acked_revision: 3,
    };
    let (gone, kept) = (record("gone"), record("kept"));
    for r in [&gone, &kept] {
        store
            .save_consumer(r)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let removed = store.remove_consumer(&gone.id).await;
    assert!(removed.unwrap_or_else(|e| panic!("{e}")), "it was there");
    assert_eq!(store.consumers().await.ok(), Some(vec![kept.clone()]));
    let again = store.remove_consumer(&gone.id).await;
    assert!(
        !again.unwrap_or_else(|e| panic!("{e}")),
        "it was gone already"
    );
    assert_eq!(store.consumers().await.ok(), Some(vec![kept]));
}

/// For persistent engines: what `first` committed is all there after reopening as `second`
/// (same epoch, head, latest, tail and bundles; consumer records are checked by each engine,
/// since their flushing differs).
pub async fn survives_reopen<S: Store>(first: S, reopen: impl FnOnce(S) -> S) {
    let before_epoch = first.load().await.unwrap_or_else(|e| panic!("{e}")).epoch;
    let code = Bytes::from_static(b"export default {}");
    let checksum = Checksum::of(&code);
    first
        .put_bundle(&checksum, code.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    committed(&first, put_by("a", "1", &code, "team-shop")).await;
    committed(&first, put("b", "1", b"b")).await;
    committed(&first, delete_by("b", "ops")).await;
    let before = first.load().await.unwrap_or_else(|e| panic!("{e}"));
    let second = reopen(first);
    let after = second.load().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(after, before);
    assert_eq!(after.epoch, before_epoch);
    assert_eq!(
        &*after.latest[0].deployer, "team-shop",
        "the deployer survives reopen"
    );
    let deployers: Vec<_> = after.tail.iter().map(|c| &*c.deployer).collect();
    assert_eq!(deployers, ["team-shop", "", "ops"]);
    assert_eq!(second.bundle(&checksum).await.ok().flatten(), Some(code));
    assert!(
        matches!(
            apply(&second, put("b", "1", b"other")).await,
            Outcome::Conflict { .. }
        ),
        "immutability survives reopen"
    );
    assert_eq!(committed(&second, put("c", "1", b"c")).await, 4);
}
