//! `/metrics` of the real binary read strictly as the Prometheus text format (0.0.4): every
//! family with one `# HELP` and one `# TYPE` before its samples, no summaries, no untyped
//! families, counters named `_total`, histograms with ascending cumulative buckets ending at
//! `+Inf` = `_count`; and every family of the README's table present before any event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

/// One family as read.
#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    /// (sample name, labels, value), in page order.
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn is_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

/// `name{a="x",b="y"} value [timestamp]`, strictly.
fn sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value: {line}"))?;
    let name = &line[..name_end];
    if !is_name(name, true) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let close;
        loop {
            if let Some((at, '}')) = chars.peek().copied() {
                close = at;
                break;
            }
            let start = chars.peek().ok_or("unclosed labels")?.0;
            let eq = inner[start..].find('=').ok_or("label without =")? + start;
            let label = &inner[start..eq];
            if !is_name(label, false) {
                return Err(format!("bad label name {label:?} in {line}"));
            }
            while chars.peek().is_some_and(|(at, _)| *at <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("unquoted label value in {line}"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        other => return Err(format!("bad escape \\{other} in {line}")),
                    },
                    c => value.push(c),
                }
            }
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label} twice in {line}"));
            }
            match chars.peek().map(|(_, c)| *c) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                _ => return Err(format!("expected , or }} in {line}")),
            }
        }
        rest = &inner[close + 1..];
    }
    let mut words = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("no space before the value: {line}"))?
        .split(' ');
    let value = words.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("bad value {v:?} in {line}"))?,
    };
    if let Some(timestamp) = words.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp in {line}"))?;
    }
    if words.next().is_some() {
        return Err(format!("trailing text in {line}"));
    }
    Ok((name.to_owned(), labels, value))
}

/// The family a sample name belongs to, given the families typed so far.
fn family_of<'a>(name: &'a str, families: &BTreeMap<String, Family>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && families
                .get(base)
                .is_some_and(|f| matches!(f.kind.as_deref(), Some("histogram" | "summary")))
        {
            return base;
        }
    }
    name
}

/// Reads a page strictly; any departure from the format is an error naming the line.
fn parse_strict(page: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut enter = |name: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() != Some(name) {
            if finished.contains(name) {
                return Err(format!("{name}: its lines are not together"));
            }
            if let Some(previous) = current.take() {
                finished.insert(previous);
            }
            *current = Some(name.to_owned());
        }
        Ok(())
    };
    for line in page.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (keyword, name, text) = (words.next(), words.next(), words.next());
            match (keyword, name) {
                (Some("HELP"), Some(name)) => {
                    enter(name, &mut current)?;
                    let family = families.entry(name.to_owned()).or_default();
                    if family.help.is_some() || family.kind.is_some() || !family.samples.is_empty()
                    {
                        return Err(format!("{name}: HELP twice or after TYPE/samples"));
                    }
                    let text = text.unwrap_or_default();
                    if text.trim().is_empty() {
                        return Err(format!("{name}: empty HELP"));
                    }
                    family.help = Some(text.to_owned());
                }
                (Some("TYPE"), Some(name)) => {
                    enter(name, &mut current)?;
                    let family = families.entry(name.to_owned()).or_default();
                    if family.kind.is_some() || !family.samples.is_empty() {
                        return Err(format!("{name}: TYPE twice or after samples"));
                    }
                    let kind = text.ok_or_else(|| format!("{name}: TYPE without a type"))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(format!("{name}: unknown type {kind}"));
                    }
                    family.kind = Some(kind.to_owned());
                }
                _ => {} // other comments are allowed
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, value) = sample(line)?;
        let base = family_of(&name, &families).to_owned();
        enter(&base, &mut current)?;
        let family = families
            .get_mut(&base)
            .ok_or_else(|| format!("{name}: sample without HELP/TYPE"))?;
        if family.kind.is_none() {
            return Err(format!("{name}: sample before TYPE"));
        }
        if family
            .samples
            .iter()
            .any(|(n, l, _)| *n == name && *l == labels)
        {
            return Err(format!("{name}{labels:?}: the same series twice"));
        }
        family.samples.push((name, labels, value));
    }
    for (name, family) in &families {
        let kind = family.kind.as_deref().unwrap_or("untyped");
        if family.help.is_none() {
            return Err(format!("{name}: no HELP"));
        }
        match kind {
            "counter" => {
                if !name.ends_with("_total") {
                    return Err(format!("counter {name} is not named _total"));
                }
                for (sample, _, value) in &family.samples {
                    if sample != name || *value < 0.0 || value.is_nan() {
                        return Err(format!("counter {name}: sample {sample} = {value}"));
                    }
                }
            }
            "gauge" => {
                if let Some((sample, ..)) = family.samples.iter().find(|(s, ..)| s != name) {
                    return Err(format!("gauge {name}: sample {sample}"));
                }
            }
            "histogram" => check_histogram(name, family)?,
            other => {
                return Err(format!(
                    "{name} is a {other}; want counter, gauge or histogram"
                ));
            }
        }
    }
    Ok(families)
}

type Labels = BTreeMap<String, String>;

/// One histogram series: (upper bound, cumulative count) per bucket, `_count`, whether `_sum`
/// was there.
type HistogramSeries = (Vec<(f64, f64)>, Option<f64>, bool);

fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut series: BTreeMap<Labels, HistogramSeries> = BTreeMap::new();
    for (sample, labels, value) in &family.samples {
        let mut key = labels.clone();
        let le = key.remove("le");
        let entry = series.entry(key).or_default();
        match sample.strip_prefix(name) {
            Some("_bucket") => {
                let le = le.ok_or_else(|| format!("{sample} without le"))?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().map_err(|_| format!("{sample}: le={le}"))?
                };
                entry.0.push((bound, *value));
            }
            Some("_count") => entry.1 = Some(*value),
            Some("_sum") => entry.2 = true,
            _ => return Err(format!("histogram {name}: sample {sample}")),
        }
    }
    if series.is_empty() {
        return Err(format!("histogram {name} has no series"));
    }
    for (labels, (buckets, count, sum)) in series {
        let count = count.ok_or_else(|| format!("{name}{labels:?}: no _count"))?;
        if !sum {
            return Err(format!("{name}{labels:?}: no _sum"));
        }
        if buckets.len() < 2 {
            return Err(format!("{name}{labels:?}: {} buckets", buckets.len()));
        }
        for pair in buckets.windows(2) {
            if pair[1].0 <= pair[0].0 || pair[1].1 < pair[0].1 {
                return Err(format!("{name}{labels:?}: buckets not ascending: {pair:?}"));
            }
        }
        let last = buckets.last().unwrap();
        if last.0 != f64::INFINITY || last.1 != count {
            return Err(format!(
                "{name}{labels:?}: last bucket {last:?}, count {count}"
            ));
        }
    }
    Ok(())
}

/// The families of the README's Metrics table (a row may name two).
fn documented_families() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("### Metrics")
        .nth(1)
        .expect("a Metrics section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut names = Vec::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split('|').nth(1).unwrap();
        names.extend(first_cell.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    assert!(names.len() > 20, "{names:?}");
    names
}

fn value(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let family = families
        .get(family_of(name, families))
        .unwrap_or_else(|| panic!("no {name}"));
    family
        .samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels.len() == l.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no {name}{labels:?} in {:?}", family.samples))
        .2
}

#[test]
fn the_strict_reader_refuses_what_prometheus_would() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
    assert!(parse_strict(good).is_ok());
    for (bad, why) in [
        ("# TYPE a_total counter\na_total 1\n", "no HELP"),
        (
            "# HELP s S.\n# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 1\ns_count 1\n",
            "summary",
        ),
        ("# HELP a A.\n# TYPE a counter\na 1\n", "_total"),
        (
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=1} 1\n",
            "unquoted",
        ),
        (
            "# HELP g G.\n# TYPE g gauge\ng 1\n# HELP h H.\n# TYPE h gauge\nh 1\ng{a=\"b\"} 2\n",
            "together",
        ),
        (
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "ascending",
        ),
        ("x 1\n", "without HELP"),
    ] {
        let error = parse_strict(bad).expect_err(why);
        assert!(error.contains(why), "{why}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_family_is_there_before_any_event_with_help_and_no_summary() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let page = metrics_text(server.addr("http")).await;
    let families = parse_strict(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
    let missing: Vec<String> = documented_families()
        .into_iter()
        .filter(|name| !families.contains_key(name))
        .collect();
    assert!(
        missing.is_empty(),
        "missing before any event: {missing:?}\n{page}"
    );

    let commit = workerpush::COMMIT;
    assert_eq!(
        value(
            &families,
            "workerpush_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("commit", commit)]
        ),
        1.0
    );
    for limit in workerpush::telemetry::LIMITS {
        assert_eq!(
            value(
                &families,
                "workerpush_limit_refusals_total",
                &[("limit", limit)]
            ),
            0.0
        );
    }
    assert_eq!(
        value(&families, "workerpush_upload_core_retries_total", &[]),
        0.0
    );
    assert_eq!(
        value(
            &families,
            "workerpush_ack_latency_seconds_count",
            &[("transport", "grpc")]
        ),
        0.0
    );
    assert_eq!(value(&families, "workerpush_head_revision", &[]), 0.0);
    assert!(value(&families, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&families, "process_open_fds", &[]) >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_changes_and_acks_the_page_still_reads_strictly_and_the_gauges_follow() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let (grpc, http) = (server.addr("grpc"), server.addr("http"));
    let mut consumer =
        HandConsumer::subscribe(&server.certs(), grpc, "consumer-1", &[], None).await;
    let (status, body) = hook_put(http, &secret, "measured", "1.0.0", b"code").await;
    assert_eq!(status, 201, "{body}");
    let revision = body["revision"].as_u64().unwrap();
    let update = consumer.next_change().await;

    // Delivered, not yet acknowledged: one consumer one worker behind.
    let families = parse_strict(&metrics_text(http).await).unwrap();
    assert_eq!(
        value(&families, "workerpush_head_revision", &[]),
        revision as f64
    );
    assert_eq!(value(&families, "workerpush_consumers_connected", &[]), 1.0);
    assert_eq!(value(&families, "workerpush_consumers_lagging", &[]), 1.0);
    assert_eq!(
        value(&families, "workerpush_consumer_lag_workers_max", &[]),
        1.0
    );
    assert_eq!(
        value(
            &families,
            "workerpush_changes_published_total",
            &[("kind", "put")]
        ),
        1.0
    );

    consumer.ack(&update, None).await;
    let mut caught_up = false;
    for _ in 0..200 {
        let page = metrics_text(http).await;
        let families = parse_strict(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        if value(&families, "workerpush_consumers_lagging", &[]) == 0.0 {
            assert_eq!(
                value(
                    &families,
                    "workerpush_ack_latency_seconds_count",
                    &[("transport", "grpc")]
                ),
                1.0
            );
            caught_up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(caught_up, "the ack was counted within 4 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_latency_times_acks_of_live_changes_only_not_of_snapshot_or_replay_items() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let (grpc, http) = (server.addr("grpc"), server.addr("http"));
    let (status, body) = hook_put(http, &secret, "before", "1", b"old").await;
    assert_eq!(status, 201, "{body}");

    // Subscribed after it: `before` comes in the snapshot (RESET, PUT, SYNCED).
    let mut consumer =
        HandConsumer::subscribe(&server.certs(), grpc, "consumer-1", &[], None).await;
    let snapshot_item = consumer
        .received
        .iter()
        .find(|u| u.worker_name == "before")
        .cloned()
        .expect("the snapshot holds the earlier worker");
    let acks_and_timed = |page: &str| {
        let families = parse_strict(page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        (
            value(
                &families,
                "workerpush_acks_total",
                &[("outcome", "applied")],
            ),
            value(
                &families,
                "workerpush_ack_latency_seconds_count",
                &[("transport", "grpc")],
            ),
        )
    };
    consumer.ack(&snapshot_item, None).await;
    // The ack RPC answers after the core counted it: counted, not timed.
    assert_eq!(acks_and_timed(&metrics_text(http).await), (1.0, 0.0));

    let (status, body) = hook_put(http, &secret, "after", "1", b"new").await;
    assert_eq!(status, 201, "{body}");
    let live = consumer.next_change().await;
    assert_eq!(live.worker_name, "after");
    consumer.ack(&live, None).await;
    assert_eq!(acks_and_timed(&metrics_text(http).await), (2.0, 1.0));

    // Away while `missed` is accepted, then back resuming: it comes in the replay, accepted
    // before this subscription started, so its ack is not timed either.
    drop(consumer);
    let (status, body) = hook_put(http, &secret, "missed", "1", b"gap").await;
    assert_eq!(status, 201, "{body}");
    let epoch = body["epoch"].as_str().unwrap().to_owned();
    let back = HandConsumer::subscribe(
        &server.certs(),
        grpc,
        "consumer-1",
        &[],
        Some((&epoch, live.revision)),
    )
    .await;
    assert!(
        (back.received.iter()).all(|u| u.kind != workerpush::pb::UpdateKind::Reset as i32),
        "a replay, not a RESET"
    );
    let replayed = back
        .received
        .iter()
        .find(|u| u.worker_name == "missed")
        .cloned()
        .expect("the replay holds the missed change");
    back.ack(&replayed, None).await;
    assert_eq!(acks_and_timed(&metrics_text(http).await), (3.0, 1.0));
}
