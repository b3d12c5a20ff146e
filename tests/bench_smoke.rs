//! Smoke runs of `workerpush bench --spawn --json`, small enough for CI: each starts the real
//! binary, which spawns a core of its own. They check that nothing is lost and that the JSON
//! carries every field; they assert no timing (the machine is shared).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_workerpush");

/// Fields every report has (some null where they do not apply).
const FIELDS: &[&str] = &[
    "transport",
    "scenario",
    "measures",
    "n",
    "m",
    "s",
    "r",
    "in_flight",
    "workers",
    "p50_us",
    "p90_us",
    "p99_us",
    "max_us",
    "all_held_p50_us",
    "all_held_max_us",
    "wait_ms",
    "acked_p50_us",
    "acked_p99_us",
    "acked_max_us",
    "not_acked",
    "deliveries",
    "expected",
    "lost",
    "deliveries_per_sec",
    "duplicates",
    "verify_failures",
    "resets",
    "reconnects",
    "connect_secs",
    "publish_secs",
    "rss_per_idle_subscriber_kib",
    "cpu_seconds_per_delivery",
    "core_rss_kib",
    "core_cpu_seconds",
    "bench_rss_per_subscriber_kib",
    "bench_cpu_seconds",
    "open_file_limit",
    "machine",
];

/// Figures only a run with `--wait` has.
const WAIT_FIELDS: &[&str] = &[
    "wait_ms",
    "acked_p50_us",
    "acked_p99_us",
    "acked_max_us",
    "not_acked",
];

/// Whether a run without `--wait` measures `field` when it spawns its core.
fn measured_without_wait(field: &str) -> bool {
    field != "r" && !WAIT_FIELDS.contains(&field)
}

/// Runs `workerpush bench --spawn --json ARGS` and answers (exit code, stdout, stderr).
fn bench(args: &[&str]) -> (Option<i32>, String, String) {
    bench_with(&[&["--spawn", "--json"], args].concat())
}

/// Runs `workerpush bench ARGS` and answers (exit code, stdout, stderr).
fn bench_with(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(BIN)
        .arg("bench")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run workerpush bench");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The report of a run that must succeed, with every field present.
fn report(args: &[&str]) -> Value {
    let (code, stdout, stderr) = bench(args);
    assert_eq!(code, Some(0), "bench {args:?} failed:\n{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout:?}"));
    let object = report.as_object().expect("a JSON object");
    for field in FIELDS {
        assert!(object.contains_key(*field), "no {field:?} in {report}");
    }
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["verify_failures"], 0, "{report}");
    assert_eq!(report["deliveries"], report["expected"], "{report}");
    report
}

#[test]
fn fanout_to_50_subscribers_loses_nothing_and_reports_every_field() {
    let report = report(&["-n", "50", "-m", "20"]);
    assert_eq!(report["transport"], "grpc");
    assert_eq!(report["scenario"], "fanout");
    assert_eq!(
        (report["n"].as_u64(), report["m"].as_u64()),
        (Some(50), Some(20))
    );
    assert_eq!(report["deliveries"], 1000);
    assert_eq!(report["r"], Value::Null, "closed loop has no rate");
    // With a spawned core every figure is measured.
    for field in FIELDS.iter().filter(|f| measured_without_wait(f)) {
        assert_ne!(report[*field], Value::Null, "{field} is null in {report}");
    }
    for field in WAIT_FIELDS {
        assert_eq!(
            report[*field],
            Value::Null,
            "{field} without --wait in {report}"
        );
    }
    assert!(report["p50_us"].as_u64() <= report["p99_us"].as_u64());
    assert!(report["p99_us"].as_u64() <= report["max_us"].as_u64());
}

#[test]
fn open_loop_fanout_reports_its_rate() {
    let report = report(&["-n", "10", "-m", "10", "--rate", "200", "--workers", "3"]);
    assert_eq!(report["r"], 200.0);
    assert_eq!(report["in_flight"], Value::Null);
    assert_eq!(report["workers"], 3);
}

#[test]
fn reconnect_storm_resumes_every_subscriber_from_the_log() {
    let report = report(&["--scenario", "storm", "-n", "30", "-m", "10"]);
    assert_eq!(report["scenario"], "storm");
    assert_eq!(report["deliveries"], 300);
    assert_eq!(
        report["resets"], 0,
        "resumed from the log, not a snapshot: {report}"
    );
}

#[test]
fn bundle_of_one_mebibyte_reaches_every_subscriber_verified() {
    let report = report(&["--scenario", "bundle", "-n", "5", "-m", "2"]);
    assert_eq!(report["s"], 1 << 20);
    assert_eq!(report["r"], 1.0, "one bundle a second by default");
    assert_eq!(report["deliveries"], 10);
}

#[test]
fn invalid_flags_exit_with_the_usage_code() {
    let (code, _, stderr) = bench(&["-n", "0"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--subscribers"), "{stderr}");
}

#[test]
fn fanout_over_quic_loses_nothing() {
    let report = report(&["--transport", "quic", "-n", "50", "-m", "20"]);
    assert_eq!(report["transport"], "quic");
    assert_eq!(report["deliveries"], 1000);
    for field in FIELDS.iter().filter(|f| measured_without_wait(f)) {
        assert_ne!(report[*field], Value::Null, "{field} is null in {report}");
    }
}

#[test]
fn with_wait_every_change_is_answered_once_every_subscriber_acknowledged() {
    let report = report(&["-n", "20", "-m", "10", "--wait", "30s"]);
    assert_eq!(report["wait_ms"], 30_000);
    assert_eq!(report["not_acked"], 0, "{report}");
    let figure = |field: &str| {
        report[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {report}"))
    };
    assert!(figure("acked_p50_us") <= figure("acked_p99_us"));
    assert!(figure("acked_p99_us") <= figure("acked_max_us"));
    // A change is answered only after its last subscriber held it (and said so); the two
    // figures come from different clocks read a microsecond apart, hence the slack.
    assert!(
        figure("acked_max_us") + 1_000 >= figure("all_held_max_us"),
        "{report}"
    );
}

#[test]
fn wait_is_refused_for_the_storm_and_beyond_the_hooks_limit() {
    for args in [
        &["--scenario", "storm", "--wait", "5s"][..],
        &["--wait", "61s"][..],
    ] {
        let (code, _, stderr) = bench(args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("--wait"), "{args:?}: {stderr}");
    }
}

#[test]
fn reconnect_storm_over_quic_resumes_from_the_log() {
    let report = report(&[
        "--transport",
        "quic",
        "--scenario",
        "storm",
        "-n",
        "20",
        "-m",
        "10",
    ]);
    assert_eq!(report["deliveries"], 200);
    assert_eq!(report["resets"], 0, "{report}");
}

/// The ratios a `--baseline` report carries.
const RATIOS: &[&str] = &[
    "p50",
    "p90",
    "p99",
    "max",
    "all_held_p50",
    "deliveries_per_sec",
    "cpu_seconds_per_delivery",
    "rss_per_idle_subscriber_kib",
    "connect_secs",
];

/// Checks the NATS baseline of a `--baseline nats` report: the same run's parameters, every
/// field, nothing lost, and ratios that are workerpush's figures over the baseline's.
fn check_nats_baseline(report: &Value) {
    let baseline = &report["baseline"];
    let nats = &baseline["report"];
    let object = nats
        .as_object()
        .unwrap_or_else(|| panic!("no baseline in {report}"));
    for field in FIELDS {
        assert!(object.contains_key(*field), "no {field:?} in {nats}");
    }
    assert_eq!(nats["transport"], "nats-tls");
    for same in ["scenario", "n", "m", "s", "r", "in_flight", "workers"] {
        assert_eq!(nats[same], report[same], "{same}: {report}");
    }
    assert_eq!(nats["lost"], 0, "{nats}");
    assert_eq!(nats["duplicates"], 0, "{nats}");
    assert_eq!(nats["verify_failures"], 0, "{nats}");
    assert_eq!(nats["deliveries"], nats["expected"], "{nats}");
    assert_eq!(nats["deliveries"], report["deliveries"], "{report}");
    // The server is sampled like a spawned core: every figure is measured (the pace fields,
    // one of them null, are the run's, compared above).
    let measured = |f: &&&str| measured_without_wait(f) && **f != "in_flight";
    for field in FIELDS.iter().filter(measured) {
        assert_ne!(nats[*field], Value::Null, "{field} is null in {nats}");
    }
    let ratios = baseline["ratios"]
        .as_object()
        .unwrap_or_else(|| panic!("no ratios in {baseline}"));
    for ratio in RATIOS {
        assert!(
            ratios.contains_key(*ratio),
            "no ratio {ratio:?} in {baseline}"
        );
    }
    let figure = |report: &Value, field: &str| {
        report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} in {report}"))
    };
    for (ratio, field) in [
        ("p50", "p50_us"),
        ("p99", "p99_us"),
        ("deliveries_per_sec", "deliveries_per_sec"),
    ] {
        let expected = figure(report, field) / figure(nats, field);
        let actual = figure(&baseline["ratios"], ratio);
        assert!(
            (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "{ratio}: {actual} is not {expected} in {report}"
        );
    }
}

#[test]
fn nats_baseline_in_both_loops_loses_nothing_and_reports_every_field_and_ratio() {
    let closed = report(&["-n", "20", "-m", "20", "--baseline", "nats"]);
    assert_eq!(closed["baseline"]["report"]["in_flight"], 8);
    check_nats_baseline(&closed);
    let open = report(&["-n", "20", "-m", "20", "-r", "200", "--baseline", "nats"]);
    assert_eq!(open["baseline"]["report"]["r"], 200.0);
    check_nats_baseline(&open);
}

#[test]
fn without_baseline_the_report_has_none() {
    let report = report(&["-n", "2", "-m", "2"]);
    assert!(report.get("baseline").is_none(), "{report}");
}

#[test]
fn nats_baseline_text_prints_the_ratios_beside_workerpush() {
    let (code, stdout, stderr) =
        bench_with(&["--spawn", "-n", "3", "-m", "3", "--baseline", "nats"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("workerpush bench fanout over grpc"),
        "{stdout}"
    );
    assert!(stdout.contains("fanout over nats-tls"), "{stdout}");
    assert!(
        stdout.contains("workerpush grpc ÷ nats-tls: p50 "),
        "{stdout}"
    );
}

#[test]
fn nats_baseline_is_refused_for_the_storm_and_with_wait_and_names_a_missing_server() {
    for args in [
        &["--scenario", "storm", "--baseline", "nats"][..],
        &["--wait", "5s", "--baseline", "nats"][..],
    ] {
        let (code, _, stderr) = bench(args);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("--baseline"), "{args:?}: {stderr}");
    }
    let missing = "/nonexistent/nats-server";
    let (code, stdout, stderr) = bench(&[
        "-n",
        "2",
        "-m",
        "2",
        "--baseline",
        "nats",
        "--nats-server",
        missing,
    ]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(missing) && stderr.contains("apt-get install nats-server"),
        "{stderr}"
    );
}
