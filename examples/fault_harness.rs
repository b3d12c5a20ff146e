//! Long fault runs, on demand: the scenarios of `tests/faults.rs` at any size, any number of
//! times, each with its seed printed (and replayable with `--seed` or `FAULT_SEED`).
//!
//! ```sh
//! cargo build                      # the workerpush binary the harness starts and kills
//! cargo run --example fault_harness -- --scenario all --runs 5 --scale 5
//! cargo run --example fault_harness -- --scenario core_kill --cycles 200 --changes 20000
//! FAULT_SEED=123 cargo run --example fault_harness -- --scenario quic_loss
//! ```
//!
//! Exits 1 if any run finds a violation, after printing every report.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use workerpush::faults::{
    scenario::{self, Fault, Scenario, Setup},
    seed_from_env,
};

/// Runs fault scenarios against the real binary and checks the delivery promises.
#[derive(Debug, Parser)]
struct Args {
    /// `all`, or one of quic_loss, tcp_cuts, core_kill, redis_kill, slow_consumers,
    /// reconnect_storm (repeatable).
    #[arg(long, default_value = "all")]
    scenario: Vec<String>,
    /// The seed of the first run (default: `FAULT_SEED`, else random); later runs use seed+1, …
    #[arg(long)]
    seed: Option<u64>,
    /// How many runs of each scenario.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Multiplies the changes (and kill cycles, outages, storms) of each scenario.
    #[arg(long, default_value_t = 1)]
    scale: u32,
    /// Changes per run (overrides the scenario's, before `--scale`).
    #[arg(long)]
    changes: Option<usize>,
    /// Consumers per run (besides the auditor).
    #[arg(long)]
    consumers: Option<usize>,
    /// Workers per run.
    #[arg(long)]
    workers: Option<usize>,
    /// Kill cycles of `core_kill` (before `--scale`).
    #[arg(long)]
    cycles: Option<u32>,
    /// Hook requests in flight.
    #[arg(long)]
    in_flight: Option<usize>,
    /// The workerpush binary (default: next to this example, `target/debug/workerpush`).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// `redis-server`.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
}

fn scenarios(args: &Args) -> anyhow::Result<Vec<Scenario>> {
    let mut chosen = Vec::new();
    for name in &args.scenario {
        if name == "all" {
            chosen.extend(Scenario::all());
        } else {
            chosen.push(Scenario::named(name).with_context(|| format!("no scenario {name:?}"))?);
        }
    }
    for s in &mut chosen {
        let scale = args.scale.max(1);
        s.changes = args.changes.unwrap_or(s.changes) * scale as usize;
        s.consumers = args.consumers.unwrap_or(s.consumers);
        s.workers = args.workers.unwrap_or(s.workers);
        s.in_flight = args.in_flight.unwrap_or(s.in_flight);
        s.converge_within = Duration::from_secs(120);
        s.fault = match s.fault {
            Fault::CoreKill { cycles } => Fault::CoreKill {
                cycles: args.cycles.unwrap_or(cycles) * scale,
            },
            Fault::RedisKill { outages } => Fault::RedisKill {
                outages: outages * scale,
            },
            Fault::ReconnectStorm { storms } => Fault::ReconnectStorm {
                storms: storms * scale,
            },
            other => other,
        };
    }
    Ok(chosen)
}

fn workerpush_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let bin = match &args.bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .context("no target directory")?
            .join("workerpush"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build` first, or pass --bin",
            bin.display()
        );
    }
    Ok(bin)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let setup = Setup {
        workerpush: workerpush_binary(&args)?,
        redis_server: args.redis_server.clone(),
    };
    let first_seed = args.seed.unwrap_or_else(seed_from_env);
    let mut failed = Vec::new();
    let mut reports = Vec::new();
    for scenario in scenarios(&args)? {
        for run in 0..args.runs {
            let seed = first_seed.wrapping_add(u64::from(run));
            let report = scenario::run(&scenario, seed, &setup).await?;
            print!("{report}");
            if !report.passed() {
                failed.push(format!("{} seed={seed}", scenario.name));
            }
            reports.push(report);
        }
    }
    println!("faults: summary");
    for r in &reports {
        println!(
            "faults:   {:<16} seed={:<20} {} lost_final_states={} order_violations={} \
             duplicates={} skipped={} convergence={} elapsed={:.1?}",
            r.scenario,
            r.seed,
            if r.passed() { "PASS" } else { "FAIL" },
            r.figures.lost_final_states,
            r.figures.order_violations,
            r.figures.duplicates,
            r.figures.skipped,
            r.convergence
                .map_or("never".to_owned(), |d| format!("{d:.2?}")),
            r.elapsed,
        );
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("faults: FAILED: {failed:?}");
        Ok(ExitCode::FAILURE)
    }
}
