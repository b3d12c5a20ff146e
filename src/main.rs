//! The `workerpush` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use workerpush::{
    app, bench,
    config::{Cli, Command},
    ctl, logs, tls, watch,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logs::init(cli.log_format) {
        eprintln!("workerpush: {error}");
        return ExitCode::from(error.exit_code());
    }
    tls::install_crypto_provider();
    if let Command::Certs(args) = &cli.command {
        return certs(args);
    }
    if let Command::Completions(args) = &cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            args.shell,
            &mut Cli::command(),
            "workerpush",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("workerpush: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        let result = match cli.command {
            Command::Serve(args) => app::serve(args, shutdown).await,
            Command::Core(args) => app::core(args, shutdown).await,
            Command::Upload(args) => app::upload(args, shutdown).await,
            Command::Watch(args) => {
                return match watch::run(args, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("workerpush watch: {error}");
                        ExitCode::from(error.exit_code())
                    }
                };
            }
            Command::Bench(args) => {
                let json = args.json;
                return match bench::run(args, shutdown).await {
                    Ok(report) => {
                        println!("{}", report.render(json));
                        let problems = report.problems();
                        if problems.is_empty() {
                            ExitCode::SUCCESS
                        } else {
                            eprintln!("workerpush bench: {}", problems.join("; "));
                            ExitCode::FAILURE
                        }
                    }
                    Err(error) => {
                        eprintln!("workerpush bench: {error}");
                        ExitCode::from(error.exit_code())
                    }
                };
            }
            Command::Ctl(args) => {
                return match ctl::run(args).await {
                    Ok(text) => {
                        println!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("workerpush ctl: {error}");
                        ExitCode::from(error.exit_code())
                    }
                };
            }
            Command::Certs(_) | Command::Completions(_) => return ExitCode::SUCCESS,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("workerpush: {error}");
                ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
            }
        }
    })
}

fn certs(args: &workerpush::config::CertsArgs) -> ExitCode {
    let request = tls::PkiRequest {
        out: args.out.clone(),
        clients: args.clients.clone(),
        sans: args.sans.clone(),
        force: args.force,
    };
    match tls::generate(&request) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("workerpush certs: {error}");
            ExitCode::from(1)
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}
