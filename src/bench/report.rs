//! The figures of a run: one JSON object (`--json`) or a few human lines.

use std::fmt::Write;

use serde::Serialize;

use super::host::Machine;

/// Percentiles of a set of durations, µs (nearest rank).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Spread {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Spread {
    /// The spread of `values` (sorted in place); `None` when empty.
    pub fn of(values: &mut [u64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        let rank = |percent: usize| {
            let rank = (values.len() * percent).div_ceil(100).max(1);
            values[rank - 1]
        };
        Some(Self {
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: values[values.len() - 1],
        })
    }
}

/// Everything a run measured. Field names are stable: scripts read them.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `grpc` or `quic`; a `--baseline nats` report: `nats-tls`.
    pub transport: &'static str,
    /// `fanout`, `bundle` or `storm`.
    pub scenario: &'static str,
    /// What the latency percentiles measure.
    pub measures: &'static str,
    /// Subscribers.
    pub n: usize,
    /// Changes published.
    pub m: usize,
    /// Bytes of code per change.
    pub s: usize,
    /// Open loop: changes per second; closed loop: null.
    pub r: Option<f64>,
    /// Closed loop: hook requests in flight; open loop: null.
    pub in_flight: Option<usize>,
    /// Workers the changes rotate over.
    pub workers: usize,
    /// Median latency, µs.
    pub p50_us: Option<u64>,
    /// 90th percentile latency, µs.
    pub p90_us: Option<u64>,
    /// 99th percentile latency, µs.
    pub p99_us: Option<u64>,
    /// Largest latency, µs.
    pub max_us: Option<u64>,
    /// Per change, from its hook request until the last subscriber held it: median, µs.
    pub all_held_p50_us: Option<u64>,
    /// Per change, from its hook request until the last subscriber held it: largest, µs.
    pub all_held_max_us: Option<u64>,
    /// `--wait`: how long each hook request waited for every subscriber to acknowledge, ms;
    /// otherwise null, like the other `acked` figures.
    pub wait_ms: Option<u64>,
    /// Per change, from its hook request until its answer said every subscriber had
    /// acknowledged it: median, µs.
    pub acked_p50_us: Option<u64>,
    /// The same, 99th percentile, µs.
    pub acked_p99_us: Option<u64>,
    /// The same, largest, µs.
    pub acked_max_us: Option<u64>,
    /// Changes whose answer came at the end of the wait with someone still pending (must be 0).
    pub not_acked: Option<u64>,
    /// (subscriber, change) pairs received and verified.
    pub deliveries: u64,
    /// N × M.
    pub expected: u64,
    /// `expected - deliveries`.
    pub lost: u64,
    /// Deliveries over the time from the first hook request to the last delivery.
    pub deliveries_per_sec: f64,
    /// Changes received twice or out of revision order (must be 0).
    pub duplicates: u64,
    /// Changes whose code did not match its checksum (must be 0).
    pub verify_failures: u64,
    /// RESETs after subscribers had synced (a subscriber fell out of the retained log).
    pub resets: u64,
    /// Subscriber connections lost and re-established during the run.
    pub reconnects: u64,
    /// Time to connect every subscriber and see its first SYNCED, seconds.
    pub connect_secs: f64,
    /// Time from the first hook request to the last answer, seconds.
    pub publish_secs: f64,
    /// Spawned core: (RSS with N idle subscribers − RSS before) / N, KiB.
    pub rss_per_idle_subscriber_kib: Option<f64>,
    /// Spawned core: CPU seconds (user + system) of the measured phase / deliveries.
    pub cpu_seconds_per_delivery: Option<f64>,
    /// Spawned core: RSS with N idle subscribers, KiB.
    pub core_rss_kib: Option<u64>,
    /// Spawned core: CPU seconds of the measured phase.
    pub core_cpu_seconds: Option<f64>,
    /// This process (subscribers and publisher): CPU seconds of the measured phase. On one
    /// machine with a spawned core, both compete for the same cores.
    pub bench_cpu_seconds: Option<f64>,
    /// This process (the subscribers' side): RSS growth per connected subscriber, KiB.
    pub bench_rss_per_subscriber_kib: Option<f64>,
    /// The open-file limit the run had.
    pub open_file_limit: u64,
    /// Where it ran.
    pub machine: Machine,
    /// `--baseline`: the same fan-out through the baseline engine, and the ratios. Absent
    /// without `--baseline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<Baseline>>,
}

/// The baseline's own report (`transport` says which engine: `nats-tls`) and workerpush's
/// figures divided by it.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// The baseline's figures, field for field as workerpush's (its server in the `core_*`,
    /// `rss_per_idle_subscriber_kib` and `cpu_seconds_per_delivery` fields).
    pub report: Report,
    /// Workerpush ÷ baseline.
    pub ratios: Ratios,
}

/// Workerpush's figure ÷ the baseline's (null where either is missing or the baseline's is
/// 0). For latencies, CPU and memory below 1 means workerpush does better; for deliveries
/// per second above 1 does.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Ratios {
    /// Median latency.
    pub p50: Option<f64>,
    /// 90th percentile latency.
    pub p90: Option<f64>,
    /// 99th percentile latency.
    pub p99: Option<f64>,
    /// Largest latency.
    pub max: Option<f64>,
    /// Median time until every subscriber held a change.
    pub all_held_p50: Option<f64>,
    /// Deliveries per second.
    pub deliveries_per_sec: Option<f64>,
    /// Server CPU per delivery.
    pub cpu_seconds_per_delivery: Option<f64>,
    /// Server RSS per idle subscriber.
    pub rss_per_idle_subscriber_kib: Option<f64>,
    /// Time to connect and sync every subscriber.
    pub connect_secs: Option<f64>,
}

impl Baseline {
    /// `baseline` beside `ours`.
    pub fn new(ours: &Report, baseline: Report) -> Self {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let us = |v: Option<u64>| v.map(|v| v as f64);
        let ratios = Ratios {
            p50: ratio(us(ours.p50_us), us(baseline.p50_us)),
            p90: ratio(us(ours.p90_us), us(baseline.p90_us)),
            p99: ratio(us(ours.p99_us), us(baseline.p99_us)),
            max: ratio(us(ours.max_us), us(baseline.max_us)),
            all_held_p50: ratio(us(ours.all_held_p50_us), us(baseline.all_held_p50_us)),
            deliveries_per_sec: ratio(
                Some(ours.deliveries_per_sec),
                Some(baseline.deliveries_per_sec),
            ),
            cpu_seconds_per_delivery: ratio(
                ours.cpu_seconds_per_delivery,
                baseline.cpu_seconds_per_delivery,
            ),
            rss_per_idle_subscriber_kib: ratio(
                ours.rss_per_idle_subscriber_kib,
                baseline.rss_per_idle_subscriber_kib,
            ),
            connect_secs: ratio(Some(ours.connect_secs), Some(baseline.connect_secs)),
        };
        Self {
            report: baseline,
            ratios,
        }
    }

    /// The baseline's summary and a line of ratios.
    fn render(&self, ours: &str) -> String {
        let mut out = format!(
            "baseline, the same run through {}:\n",
            self.report.transport
        );
        out.push_str(&self.report.render(false));
        let figures = [
            ("p50", self.ratios.p50),
            ("p99", self.ratios.p99),
            ("max", self.ratios.max),
            ("all held p50", self.ratios.all_held_p50),
            ("deliveries/s", self.ratios.deliveries_per_sec),
            ("CPU per delivery", self.ratios.cpu_seconds_per_delivery),
            (
                "RSS per idle subscriber",
                self.ratios.rss_per_idle_subscriber_kib,
            ),
            ("connect", self.ratios.connect_secs),
        ];
        let shown: Vec<String> = figures
            .iter()
            .filter_map(|(name, ratio)| ratio.map(|r| format!("{name} {r:.2}×")))
            .collect();
        let _ = write!(
            out,
            "\n  workerpush {} ÷ {}: {}",
            ours,
            self.report.transport,
            shown.join(", ")
        );
        out
    }
}

impl Report {
    /// Fills the latency fields from `spread`.
    pub fn set_latency(&mut self, spread: Option<Spread>) {
        self.p50_us = spread.map(|s| s.p50);
        self.p90_us = spread.map(|s| s.p90);
        self.p99_us = spread.map(|s| s.p99);
        self.max_us = spread.map(|s| s.max);
    }

    /// What went wrong, if anything: lost, duplicated or corrupted deliveries.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.lost > 0 {
            problems.push(format!(
                "{} of {} deliveries lost",
                self.lost, self.expected
            ));
        }
        if self.duplicates > 0 {
            problems.push(format!("{} duplicate deliveries", self.duplicates));
        }
        if self.verify_failures > 0 {
            problems.push(format!(
                "{} deliveries failed verification",
                self.verify_failures
            ));
        }
        if let Some(not_acked) = self.not_acked.filter(|&n| n > 0) {
            problems.push(format!(
                "{not_acked} changes not acknowledged by every subscriber within the wait"
            ));
        }
        if let Some(baseline) = &self.baseline {
            problems.extend(
                baseline
                    .report
                    .problems()
                    .into_iter()
                    .map(|p| format!("baseline {}: {p}", baseline.report.transport)),
            );
        }
        problems
    }

    /// One JSON object, or the human summary.
    pub fn render(&self, json: bool) -> String {
        if json {
            return serde_json::to_string(self)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        }
        let mut out = String::new();
        let pace = match (self.r, self.in_flight) {
            (Some(rate), _) => format!("open loop at {rate}/s"),
            (None, Some(in_flight)) => format!("closed loop, {in_flight} in flight"),
            (None, None) => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "workerpush bench {} over {}: {} subscribers, {} changes of {} B to {} workers, {pace}",
            self.scenario, self.transport, self.n, self.m, self.s, self.workers
        );
        let _ = writeln!(
            out,
            "  connected and synced {} subscribers in {:.2} s; published in {:.2} s",
            self.n, self.connect_secs, self.publish_secs
        );
        let latency = [self.p50_us, self.p90_us, self.p99_us, self.max_us];
        if let [Some(p50), Some(p90), Some(p99), Some(max)] = latency {
            let _ = writeln!(
                out,
                "  {}: p50 {}  p90 {}  p99 {}  max {}",
                self.measures,
                us(p50),
                us(p90),
                us(p99),
                us(max)
            );
        }
        if let (Some(p50), Some(max)) = (self.all_held_p50_us, self.all_held_max_us) {
            let _ = writeln!(
                out,
                "  until every subscriber held a change: p50 {}  max {}",
                us(p50),
                us(max)
            );
        }
        if let (Some(p50), Some(p99), Some(max)) =
            (self.acked_p50_us, self.acked_p99_us, self.acked_max_us)
        {
            let _ = writeln!(
                out,
                "  hook request -> answer after every subscriber acknowledged: p50 {}  p99 {}  max {}; not acknowledged {}",
                us(p50),
                us(p99),
                us(max),
                self.not_acked.unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "  deliveries {} of {}, lost {}, {:.0}/s; duplicates {}, verify failures {}, resets {}, reconnects {}",
            self.deliveries,
            self.expected,
            self.lost,
            self.deliveries_per_sec,
            self.duplicates,
            self.verify_failures,
            self.resets,
            self.reconnects
        );
        if let (Some(rss), Some(cpu), Some(total)) = (
            self.rss_per_idle_subscriber_kib,
            self.cpu_seconds_per_delivery,
            self.core_rss_kib,
        ) {
            let _ = writeln!(
                out,
                "  core: {rss:.1} KiB RSS per idle subscriber ({:.1} MiB in all), {:.2} µs CPU per delivery",
                to_mib(total),
                cpu * 1e6
            );
        }
        if let (Some(rss), Some(cpu)) = (self.bench_rss_per_subscriber_kib, self.bench_cpu_seconds)
        {
            let _ = writeln!(
                out,
                "  bench: {rss:.1} KiB RSS per subscriber connection, {cpu:.2} CPU seconds (core: {:.2})",
                self.core_cpu_seconds.unwrap_or(f64::NAN)
            );
        }
        let _ = write!(
            out,
            "  machine: {} cores, {}; open-file limit {}",
            self.machine.cores, self.machine.cpu, self.open_file_limit
        );
        if let Some(baseline) = &self.baseline {
            let _ = write!(out, "\n{}", baseline.render(self.transport));
        }
        out
    }
}

fn to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `850 µs`, `12.34 ms`, `1.234 s`.
fn us(value: u64) -> String {
    let v = value as f64;
    if value < 1_000 {
        format!("{value} µs")
    } else if value < 1_000_000 {
        format!("{:.2} ms", v / 1e3)
    } else {
        format!("{:.3} s", v / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut values: Vec<u64> = (1..=100).rev().collect();
        let spread = Spread::of(&mut values).unwrap();
        assert_eq!(
            spread,
            Spread {
                p50: 50,
                p90: 90,
                p99: 99,
                max: 100
            }
        );
        assert_eq!(
            Spread::of(&mut [7]),
            Some(Spread {
                p50: 7,
                p90: 7,
                p99: 7,
                max: 7
            })
        );
        let mut ten: Vec<u64> = (1..=10).collect();
        assert_eq!(Spread::of(&mut ten).map(|s| (s.p50, s.p99)), Some((5, 10)));
        assert_eq!(Spread::of(&mut []), None);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(us(850), "850 µs");
        assert_eq!(us(12_345), "12.35 ms");
        assert_eq!(us(1_234_567), "1.235 s");
    }
}
