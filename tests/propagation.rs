//! Propagation you can see, against the real binary: `?wait` on upload and hook, the admin
//! API behind its token, and `/metrics` counting a scripted run exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn keys(object: &Value) -> BTreeSet<&str> {
    object
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {object}"))
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test]
async fn upload_waits_for_two_acks_and_a_nack_then_a_resumed_consumer_acks() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, token) = server.secrets();
    let (certs, grpc, http) = (server.certs(), server.addr("grpc"), server.addr("http"));
    let mut a = HandConsumer::subscribe(&certs, grpc, "consumer-1/a", &[], None).await;
    let mut b = HandConsumer::subscribe(&certs, grpc, "consumer-1/b", &["app"], None).await;
    let mut c = HandConsumer::subscribe(&certs, grpc, "consumer-1/c", &[], None).await;

    let started = Instant::now();
    let upload = {
        let at = server.addr("upload");
        let token = token.clone();
        tokio::spawn(async move { upload_with(at, &token, "?wait=5s", "app", "1", b"v1").await })
    };
    for (consumer, verdict) in [
        (&mut a, None),
        (&mut b, None),
        (&mut c, Some("syntax error")),
    ] {
        let put = consumer.next_change().await;
        assert_eq!(
            (put.worker_name.as_str(), put.version.as_str()),
            ("app", "1")
        );
        consumer.ack(&put, verdict).await;
    }
    let (status, answer) = upload.await.unwrap();
    assert_eq!(status, 201, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the wait ended when the last subscriber answered, not at its deadline"
    );
    let propagation = &answer["propagation"];
    assert_eq!(propagation["state"], "failed", "{answer}");
    assert_eq!(propagation["subscribers"], 3);
    assert_eq!(ids(&propagation["acked"]), ["consumer-1/a", "consumer-1/b"]);
    assert_eq!(ids(&propagation["failed"]), ["consumer-1/c"]);
    assert_eq!(propagation["failed"][0]["reason"], "syntax error");
    assert_eq!(propagation["pending"], serde_json::json!([]));
    let first = answer["revision"].as_u64().unwrap();
    let epoch = answer["epoch"].as_str().unwrap().to_owned();

    let (status, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    assert_eq!(status, 200, "{worker}");
    assert_eq!(worker["version"], "1");
    assert_eq!(
        worker["propagation"], *propagation,
        "the admin API says the same"
    );

    // b is away when version 2 lands: pending, not connected, until it resumes and acks.
    drop(b);
    let (status, answer) = upload_with(server.addr("upload"), &token, "", "app", "2", b"v2").await;
    assert_eq!(status, 201, "{answer}");
    let second = answer["revision"].as_u64().unwrap();
    for consumer in [&mut a, &mut c] {
        let put = consumer.next_change().await;
        assert_eq!(put.revision, second);
        consumer.ack(&put, None).await;
    }
    let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    let propagation = &worker["propagation"];
    assert_eq!(propagation["state"], "pending", "{worker}");
    assert_eq!(ids(&propagation["acked"]), ["consumer-1/a", "consumer-1/c"]);
    assert_eq!(ids(&propagation["pending"]), ["consumer-1/b"]);
    assert_eq!(propagation["pending"][0]["connected"], false);
    let (_, consumers) = admin_get(http, Some(&token), "/v1/consumers").await;
    let away: Vec<_> = consumers["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["connected"] == false)
        .collect();
    assert_eq!(away.len(), 1, "{consumers}");
    assert_eq!(away[0]["consumer_id"], "consumer-1/b");
    assert_eq!(
        (away[0]["acked_revision"].as_u64(), away[0]["lag"].as_u64()),
        (Some(first), Some(1))
    );

    let b = HandConsumer::subscribe(
        &certs,
        grpc,
        "consumer-1/b",
        &["app"],
        Some((&epoch, first)),
    )
    .await;
    let replayed = b
        .received
        .iter()
        .find(|u| u.revision == second)
        .expect("replayed")
        .clone();
    b.ack(&replayed, None).await;
    let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    let propagation = &worker["propagation"];
    assert_eq!(propagation["state"], "complete", "{worker}");
    assert_eq!(
        ids(&propagation["acked"]),
        ["consumer-1/a", "consumer-1/b", "consumer-1/c"]
    );
    for acked in propagation["acked"].as_array().unwrap() {
        assert_eq!(acked["revision"], second);
        assert!(acked["latency_ms"].is_u64(), "{acked}");
    }

    // The hook itself waits too: re-publishing the latest version answers 200 at once, done.
    let (status, again) = hook_put_query(http, &secret, "?wait=5s", "app", "2", b"v2").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["propagation"]["state"], "complete");
    assert_eq!(again["propagation"]["revision"], second);
}

#[tokio::test]
async fn admin_endpoints_need_the_token_and_answer_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, token) = server.secrets();
    let http = server.addr("http");
    let a = HandConsumer::subscribe(
        &server.certs(),
        server.addr("grpc"),
        "consumer-1/a",
        &["app"],
        None,
    )
    .await;
    let (status, _) = hook_put(http, &secret, "app", "1.0.0", b"code").await;
    assert_eq!(status, 201);

    for path in [
        "/v1/workers",
        "/v1/workers/app",
        "/v1/consumers",
        "/status/events",
    ] {
        for given in [None, Some("wrong-token")] {
            let (status, body) = admin_get(http, given, path).await;
            assert_eq!(status, 401, "{path} with {given:?}: {body}");
            assert!(body["error"].is_string(), "{path}: {body}");
        }
    }
    for open in ["/healthz", "/readyz", "/metrics"] {
        let status = http_client()
            .get(format!("http://{http}{open}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{open}");
    }

    let (status, workers) = admin_get(http, Some(&token), "/v1/workers").await;
    assert_eq!(status, 200);
    assert_eq!(keys(&workers), BTreeSet::from(["epoch", "head", "workers"]));
    let listed = &workers["workers"][0];
    assert_eq!(
        keys(listed),
        BTreeSet::from([
            "name",
            "version",
            "revision",
            "checksum",
            "size",
            "updated_ms",
            "deployer",
            "propagation"
        ])
    );
    assert_eq!(
        listed["deployer"], "",
        "a direct hook request names no deployer"
    );
    assert_eq!(
        (listed["name"].as_str(), listed["version"].as_str()),
        (Some("app"), Some("1.0.0"))
    );
    assert_eq!(listed["checksum"], sha256(b"code"));
    assert_eq!(
        listed["propagation"],
        serde_json::json!({"revision": 1, "state": "pending", "subscribers": 1, "acked": 0, "pending": 1, "failed": 0})
    );

    let (status, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    assert_eq!(status, 200);
    assert_eq!(
        keys(&worker["propagation"]),
        BTreeSet::from([
            "revision",
            "state",
            "subscribers",
            "acked",
            "pending",
            "failed"
        ])
    );
    let pending = &worker["propagation"]["pending"][0];
    assert_eq!(
        keys(pending),
        BTreeSet::from(["consumer_id", "core", "transport", "connected", "delivered"])
    );
    assert_eq!(
        (
            pending["transport"].as_str(),
            pending["connected"].as_bool()
        ),
        (Some("grpc"), Some(true))
    );
    assert_eq!(
        admin_get(http, Some(&token), "/v1/workers/nope").await.0,
        404
    );
    assert_eq!(
        admin_get(http, Some(&token), "/v1/workers/Not_Valid")
            .await
            .0,
        400
    );

    let (status, consumers) = admin_get(http, Some(&token), "/v1/consumers").await;
    assert_eq!(status, 200);
    assert_eq!(keys(&consumers), BTreeSet::from(["head", "consumers"]));
    let consumer = &consumers["consumers"][0];
    assert_eq!(
        keys(consumer),
        BTreeSet::from([
            "consumer_id",
            "core",
            "subscription",
            "connected",
            "transport",
            "remote",
            "workers",
            "worker_count",
            "since_ms",
            "delivered_revision",
            "acked_revision",
            "lag",
            "failures",
            "endpoint",
            "labels",
        ])
    );
    assert_eq!(consumer["consumer_id"], a.id);
    assert_eq!(consumer["workers"], serde_json::json!(["app"]));
    assert_eq!(consumer["worker_count"], 1);
    assert_eq!(
        (
            consumer["delivered_revision"].as_u64(),
            consumer["lag"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert!(
        consumer["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    // Bad waits are refused before anything is published.
    let upload = server.addr("upload");
    for query in ["?wait=61s", "?wait=soon", "?wait="] {
        let (status, body) = upload_with(upload, &token, query, "app", "9", b"x").await;
        assert_eq!(status, 400, "upload {query}: {body}");
        let (status, body) = hook_put_query(http, &secret, query, "app", "9", b"x").await;
        assert_eq!(status, 400, "hook {query}: {body}");
    }
    let (_, workers) = admin_get(http, Some(&token), "/v1/workers").await;
    assert_eq!(workers["head"], 1);
}

#[tokio::test]
async fn status_page_signs_in_once_with_a_cookie_and_drops_the_token_from_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let http = server.addr("http");
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str, cookie: Option<&str>| {
        let mut request = browser.get(format!("http://{http}{path}"));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send()
    };

    let login = get("/", None).await.unwrap();
    assert_eq!(login.status(), 401);
    assert!(login.text().await.unwrap().contains("name=\"token\""));
    assert_eq!(get("/?token=wrong", None).await.unwrap().status(), 401);

    let signed_in = get(&format!("/?token={token}"), None).await.unwrap();
    assert_eq!(signed_in.status(), 303);
    assert_eq!(signed_in.headers()["location"], "/");
    let set_cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains(&token), "the cookie is not the token");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let page = get("/", Some(&cookie)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'nonce-")
    );
    let html = page.text().await.unwrap();
    assert!(
        html.contains("id=\"workers\"") && html.contains("id=\"consumers\""),
        "{html}"
    );
    assert!(!html.contains(&token));
    // The cookie opens the JSON API too (the page's event stream uses it).
    let (status, _) = {
        let answer = get("/v1/workers", Some(&cookie)).await.unwrap();
        (answer.status().as_u16(), ())
    };
    assert_eq!(status, 200);

    let form = browser
        .post(format!("http://{http}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 303);
    // Each sign-in opens its own session, with the same attributes.
    let second = form.headers()["set-cookie"].to_str().unwrap();
    let attributes = |cookie: &str| cookie.split_once(';').unwrap().1.to_owned();
    assert_eq!(attributes(second), attributes(&set_cookie));
    assert_ne!(second, set_cookie);
    let second = second.split(';').next().unwrap();
    assert_eq!(get("/", Some(second)).await.unwrap().status(), 200);
}

/// Metrics parsed from `/metrics`: (name, sorted labels) → value; histograms as their
/// `_count` and one entry per bucket.
struct Scrape(std::collections::HashMap<String, f64>);

impl Scrape {
    async fn take(http: std::net::SocketAddr) -> Self {
        let text = metrics_text(http).await;
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
        let mut values = std::collections::HashMap::new();
        for sample in parsed.samples {
            let mut labels: Vec<_> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            let key = format!("{}{{{}}}", sample.metric, labels.join(","));
            match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => {
                    values.insert(key, v);
                }
                prometheus_parse::Value::Histogram(buckets) => {
                    for bucket in buckets {
                        values.insert(format!("{key}@le={}", bucket.less_than), bucket.count);
                    }
                }
                prometheus_parse::Value::Summary(_) => {}
            }
        }
        Self(values)
    }

    fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// How much `key` moved since `before`.
    fn delta(&self, before: &Self, key: &str) -> f64 {
        self.get(key) - before.get(key)
    }
}

#[tokio::test]
async fn metrics_parse_and_count_a_scripted_run_exactly() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, token) = server.secrets();
    let (certs, grpc, http, upload) = (
        server.certs(),
        server.addr("grpc"),
        server.addr("http"),
        server.addr("upload"),
    );
    let before = Scrape::take(http).await;

    // Two fresh subscriptions: RESET + SYNCED each.
    let mut a = HandConsumer::subscribe(&certs, grpc, "consumer-1/a", &[], None).await;
    let mut b = HandConsumer::subscribe(&certs, grpc, "consumer-1/b", &[], None).await;
    // Two new versions, one repeat (no change), one delete; each change reaches both.
    assert_eq!(
        upload_with(upload, &token, "", "app", "1", b"one").await.0,
        201
    );
    assert_eq!(
        upload_with(upload, &token, "", "app", "1", b"one").await.0,
        200
    );
    let v1 = a.next_change().await;
    b.next_change().await;
    a.ack(&v1, None).await;
    assert_eq!(
        upload_with(upload, &token, "", "app", "2", b"two").await.0,
        201
    );
    let v2 = a.next_change().await;
    b.next_change().await;
    a.ack(&v2, Some("syntax error")).await;
    assert_eq!(hook_delete(http, &secret, "app").await.0, 200);
    a.next_change().await;
    b.next_change().await;
    // Refusals: a wrong upload token, a hook request signed with the wrong secret.
    assert_eq!(
        upload_with(upload, "wrong", "", "app", "3", b"x").await.0,
        401
    );
    assert_eq!(
        hook_put(http, "not-the-secret", "app", "3", b"x").await.0,
        401
    );
    // a leaves and resumes from where it is: a replay (nothing missed), then SYNCED.
    let position = a
        .received
        .last()
        .map(|u| (u.epoch.clone(), u.revision))
        .unwrap();
    let mut received = std::mem::take(&mut a.received);
    drop(a);
    let a = HandConsumer::subscribe(
        &certs,
        grpc,
        "consumer-1/a",
        &[],
        Some((&position.0, position.1)),
    )
    .await;
    received.extend(a.received.iter().cloned());
    received.extend(b.received.iter().cloned());

    // The old subscription of a ends when the server notices the stream went away: poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let scrape = Scrape::take(http).await;
        if scrape.get("workerpush_subscribers{transport=grpc}") == 2.0 || Instant::now() > deadline
        {
            break scrape;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let moved = |key: &str| after.delta(&before, key);
    assert_eq!(after.get("workerpush_subscribers{transport=grpc}"), 2.0);
    assert_eq!(moved("workerpush_subscriptions_total{start=reset}"), 2.0);
    assert_eq!(moved("workerpush_subscriptions_total{start=replay}"), 1.0);
    assert_eq!(moved("workerpush_resyncs_total{reason=lagged}"), 0.0);
    assert_eq!(moved("workerpush_changes_published_total{kind=put}"), 2.0);
    assert_eq!(
        moved("workerpush_changes_published_total{kind=delete}"),
        1.0
    );
    // a: RESET, SYNCED, 3 changes, SYNCED after resuming; b: RESET, SYNCED, 3 changes.
    assert_eq!(received.len(), 11);
    assert_eq!(moved("workerpush_deliveries_total{transport=grpc}"), 11.0);
    let bytes: usize = received.iter().map(Message::encoded_len).sum();
    assert_eq!(
        moved("workerpush_sent_bytes_total{transport=grpc}"),
        bytes as f64
    );
    // Latency is observed for the 6 live changes handed over, not for markers.
    assert_eq!(
        moved("workerpush_delivery_latency_seconds_count{transport=grpc}"),
        6.0
    );
    assert_eq!(
        moved("workerpush_delivery_latency_seconds{transport=grpc}@le=inf"),
        6.0
    );
    assert!(
        after
            .0
            .keys()
            .filter(|k| k.starts_with("workerpush_delivery_latency_seconds{transport=grpc}@le="))
            .count()
            > 10,
        "a real histogram with buckets"
    );
    assert_eq!(moved("workerpush_acks_total{outcome=applied}"), 1.0);
    assert_eq!(moved("workerpush_acks_total{outcome=failed}"), 1.0);
    assert_eq!(
        moved("workerpush_ack_latency_seconds_count{transport=grpc}"),
        1.0
    );
    assert_eq!(
        moved("workerpush_upload_refusals_total{reason=unauthenticated}"),
        1.0
    );
    assert_eq!(
        moved("workerpush_hook_refusals_total{reason=bad_signature}"),
        1.0
    );
    drop((a, b));
}

/// The subscribers of `worker` as the admin API counts them: (consumer id, connected) of the
/// pending ones, and the total.
async fn pending_of(http: std::net::SocketAddr, token: &str, worker: &str) -> (Vec<String>, u64) {
    let (status, body) = admin_get(http, Some(token), &format!("/v1/workers/{worker}")).await;
    assert_eq!(status, 200, "{body}");
    let propagation = &body["propagation"];
    let pending = ids(&propagation["pending"])
        .into_iter()
        .map(str::to_owned)
        .collect();
    (pending, propagation["subscribers"].as_u64().unwrap())
}

async fn admin_delete(http: std::net::SocketAddr, token: &str, path: &str) -> (u16, Value) {
    let response = http_client()
        .delete(format!("http://{http}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    status_and_json(response).await
}

#[tokio::test]
async fn a_registered_consumer_counts_past_the_departure_window_until_it_deregisters() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--remember-departed", "1s"]);
    let (secret, token) = server.secrets();
    let (certs, grpc, quic, http) = (
        server.certs(),
        server.addr("grpc"),
        server.addr("quic"),
        server.addr("http"),
    );
    hook_put(http, &secret, "app", "1", b"v1").await;
    // Three registered consumers (each deregistered another way at the end) and one that
    // never registered, all holding version 1, then all gone.
    let registered = [
        "consumer-1/by-operator",
        "consumer-1/by-grpc",
        "consumer-1/by-quic",
    ];
    let sessions = [
        grpc_session(&certs, grpc, "consumer-1").await,
        grpc_session(&certs, grpc, "consumer-1").await,
        quic_session(&certs, quic, "consumer-1").await,
    ];
    for (id, session) in registered.iter().zip(&sessions) {
        let answer = session
            .register(workerpush::pb::RegisterRequest {
                consumer_id: (*id).to_owned(),
                endpoint: format!("{id}.edge:443"),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(answer.success, "{answer:?}");
    }
    for id in registered.iter().chain(&["consumer-1/unregistered"]) {
        let consumer = HandConsumer::subscribe(&certs, grpc, id, &["app"], None).await;
        let put = consumer
            .received
            .iter()
            .find(|u| u.worker_name == "app")
            .unwrap()
            .clone();
        consumer.ack(&put, None).await;
        drop(consumer);
    }
    // The unregistered consumer ages out of the window; the registered ones do not.
    let (_, body) = hook_put_query(http, &secret, "", "app", "2", b"v2").await;
    assert_eq!(body["version"], "2", "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pending = loop {
        let (pending, _) = pending_of(http, &token, "app").await;
        if !pending.iter().any(|id| id == "consumer-1/unregistered") {
            break pending;
        }
        assert!(
            Instant::now() < deadline,
            "the unregistered consumer never aged out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut sorted = registered.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        pending, sorted,
        "registered consumers stay pending, away or not"
    );
    let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    assert_eq!(worker["propagation"]["state"], "pending", "{worker}");
    assert!(
        worker["propagation"]["pending"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["connected"] == false && p["core"].as_str().is_some_and(|c| !c.is_empty())),
        "{worker}"
    );
    let (status, consumers) = admin_get(http, Some(&token), "/v1/consumers").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&consumers["consumers"]), sorted, "{consumers}");

    // Deregistered: by the operator, by DeregisterConsumer over gRPC, and over QUIC.
    let (status, answer) = admin_delete(http, &token, "/v1/consumers/consumer-1/by-operator").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["existed"], true, "{answer}");
    let (pending, subscribers) = pending_of(http, &token, "app").await;
    assert_eq!(
        (pending, subscribers),
        (
            vec![
                "consumer-1/by-grpc".to_owned(),
                "consumer-1/by-quic".to_owned()
            ],
            2
        )
    );
    for (id, session) in registered[1..].iter().zip(&sessions[1..]) {
        let answer = session
            .deregister(workerpush::pb::DeregisterRequest {
                consumer_id: (*id).to_owned(),
            })
            .await
            .unwrap();
        assert!(answer.existed, "{answer:?}");
    }
    let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    assert_eq!(worker["propagation"]["subscribers"], 0, "{worker}");
    assert_eq!(worker["propagation"]["state"], "complete", "{worker}");
    let (_, consumers) = admin_get(http, Some(&token), "/v1/consumers").await;
    assert_eq!(consumers["consumers"], serde_json::json!([]), "{consumers}");

    // Deregistering what is not known says so; a malformed id is a clear 400.
    let (status, answer) = admin_delete(http, &token, "/v1/consumers/consumer-1/by-operator").await;
    assert_eq!(
        (status, &answer["existed"]),
        (200, &Value::Bool(false)),
        "{answer}"
    );
    let (status, answer) = admin_delete(http, &token, "/v1/consumers/consumer-1/").await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("consumer id"),
        "{answer}"
    );
    let refused = sessions[0]
        .deregister(workerpush::pb::DeregisterRequest {
            consumer_id: "someone-else".to_owned(),
        })
        .await;
    assert!(
        refused.is_err(),
        "another identity's consumer may not be deregistered"
    );
}

#[tokio::test]
async fn watch_with_deregister_is_forgotten_at_once_on_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, token) = server.secrets();
    let http = server.addr("http");
    hook_put(http, &secret, "app", "1", b"v1").await;
    let watch = |id: &str, out: &str| {
        std::process::Command::new(BIN)
            .args(["watch", "--addr"])
            .arg(format!("localhost:{}", server.addr("grpc").port()))
            .args(["--consumer-id", id, "--out", out])
            .args([
                "--ca",
                "certs/ca.pem",
                "--cert",
                "certs/clients/consumer-1.pem",
            ])
            .args(["--key", "certs/clients/consumer-1-key.pem"])
            .args(if out == "leaving" {
                &["--deregister"][..]
            } else {
                &[][..]
            })
            .current_dir(dir.path())
            .env_clear()
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut leaving = watch("consumer-1/leaving", "leaving");
    let mut staying = watch("consumer-1/staying", "staying");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
        if worker["propagation"]["acked"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both watches never acked: {worker}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for child in [&mut leaving, &mut staying] {
        let pid = child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(
            child.wait().unwrap().success(),
            "watch exits cleanly on SIGTERM"
        );
    }
    // Both left inside the 5 minute window: the one that deregistered is gone at once, the
    // other is remembered as a pending subscriber of the next version.
    hook_put(http, &secret, "app", "2", b"v2").await;
    let (pending, subscribers) = pending_of(http, &token, "app").await;
    assert_eq!(
        (pending, subscribers),
        (vec!["consumer-1/staying".to_owned()], 1)
    );
}
