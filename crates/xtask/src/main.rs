//! `cargo xtask`: developer tasks of workerpush (the alias is in `.cargo/config.toml`).
//!
//! - `cargo xtask test [CARGO TEST ARGS…]` is the README's test command: it prepares the machine
//!   (below), then runs `cargo test --workspace --no-fail-fast`, so that every test binary runs
//!   even when one fails and cargo's summary names each that failed.
//! - `cargo xtask prepare` only prepares: Redis answering on 127.0.0.1:6379 (started with the
//!   machine's own command when it is not), `redis-server` for the tests that start private
//!   servers, and Debian's Chromium for the status page test — installed with `apt-get` when
//!   missing and running as root, or else the exact command to run is printed.
//!
//! The standard library only: this must build and run on a machine that has nothing yet.

mod prepare;

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{Command, ExitCode},
};

use prepare::{Preparation, Prepared};

const USAGE: &str = "\
usage: cargo xtask test [--skip-prepare] [PREPARE FLAGS] [-- CARGO TEST ARGS…]
       cargo xtask prepare [PREPARE FLAGS]

test      prepare the machine, then `cargo test --workspace --no-fail-fast [ARGS…]`
prepare   only prepare: Redis answering, redis-server and Chromium present

prepare flags:
  --redis-port PORT   the Redis to have answering on 127.0.0.1 (default 6379, the
                      port the suite's tests use)
  --redis-dir DIR     where a Redis this command starts keeps its files
                      (default /var/lib/redis, log /var/log/redis/ci.log)
  --skip-prepare      (test only) run the suite as the machine is

Chromium is looked for in $CHROMIUM_BIN, then `chromium` / `chromium-browser` on PATH, then
Debian's /usr/bin/chromium, and installed from Debian's packages when none is there (as root;
otherwise the command to run is printed). The suite is given the one found as CHROMIUM_BIN.";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::from(2)
        }
    }
}

/// What the command line asked for.
struct Invocation {
    task: Task,
    preparation: Preparation,
    skip_prepare: bool,
    cargo_args: Vec<OsString>,
}

enum Task {
    Test,
    Prepare,
    Help,
}

fn parse(args: Vec<OsString>) -> Result<Invocation, String> {
    let mut args = args.into_iter();
    let task = match args.next().as_ref().and_then(|a| a.to_str()) {
        Some("test") => Task::Test,
        Some("prepare") => Task::Prepare,
        Some("help" | "--help" | "-h") | None => Task::Help,
        Some(other) => return Err(format!("unknown task `{other}`\n{USAGE}")),
    };
    let mut invocation = Invocation {
        task,
        preparation: Preparation::default(),
        skip_prepare: false,
        cargo_args: Vec::new(),
    };
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--") => {
                invocation.cargo_args.extend(args.by_ref());
            }
            Some("--redis-port") => {
                let value = args.next().ok_or("--redis-port needs a port number")?;
                invocation.preparation.redis_port =
                    value.to_str().and_then(|v| v.parse().ok()).ok_or_else(|| {
                        format!("--redis-port: `{}` is not a port number", value.display())
                    })?;
            }
            Some("--redis-dir") => {
                let value = args.next().ok_or("--redis-dir needs a directory")?;
                invocation.preparation.redis_dir = Some(PathBuf::from(value));
            }
            Some("--skip-prepare") if matches!(invocation.task, Task::Test) => {
                invocation.skip_prepare = true;
            }
            Some("--help" | "-h") => invocation.task = Task::Help,
            // Anything else is cargo's (`cargo xtask test --test grpc`).
            _ if matches!(invocation.task, Task::Test) => invocation.cargo_args.push(arg),
            _ => return Err(format!("unknown flag `{}`\n{USAGE}", arg.display())),
        }
    }
    Ok(invocation)
}

fn run(args: Vec<OsString>) -> Result<ExitCode, String> {
    let invocation = parse(args)?;
    let prepared = match invocation.task {
        Task::Help => {
            println!("{USAGE}");
            return Ok(ExitCode::SUCCESS);
        }
        Task::Test if invocation.skip_prepare => None,
        Task::Test | Task::Prepare => match invocation.preparation.run() {
            Ok(prepared) => Some(prepared),
            Err(failure) => {
                eprintln!("xtask: {failure}");
                return Ok(ExitCode::FAILURE);
            }
        },
    };
    match invocation.task {
        Task::Test => test(prepared.as_ref(), &invocation.cargo_args),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// `cargo test --workspace --no-fail-fast ARGS…`, with what preparation found in the
/// environment; answers cargo's own exit status.
fn test(prepared: Option<&Prepared>, cargo_args: &[OsString]) -> Result<ExitCode, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_args);
    if let Some(prepared) = prepared {
        prepared.apply(&mut command);
    }
    println!("xtask: running cargo test --workspace --no-fail-fast");
    let status = command
        .status()
        .map_err(|e| format!("could not run {}: {e}", PathBuf::from(&cargo).display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
