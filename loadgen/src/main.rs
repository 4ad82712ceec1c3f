//! Run with `cargo run -p pingapp-loadgen --bin loadgen -- ws://127.0.0.1:8000 --clients 100 --duration 10s`.
//!
//! Parses the flags, runs [`loadgen::run`] until the duration is over (or
//! SIGINT/SIGTERM), and prints the summary. Exit status: 0, or 1 when no
//! client could connect, or 2 for a bad flag.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let config = match loadgen::Args::parse().into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("loadgen: {error}");
            return ExitCode::from(2);
        }
    };
    // One shared runtime for every client: on one thread when asked (the
    // cheapest per client, see docs/loadgen.md), else one worker per CPU.
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if config.threads > 1 {
            builder.worker_threads(usize::from(config.threads));
        }
        builder.enable_all().build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(config)),
        Err(error) => {
            eprintln!("loadgen: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: loadgen::Config) -> ExitCode {
    let shutdown = match services::shutdown::signal() {
        Ok(shutdown) => shutdown,
        Err(error) => {
            eprintln!("loadgen: cannot install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    let json = config.json;
    let summary = loadgen::run(config, shutdown).await;
    if json {
        match serde_json::to_string(&summary) {
            Ok(line) => println!("{line}"),
            Err(error) => {
                eprintln!("loadgen: cannot encode the summary: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{summary}");
    }
    if summary.clients_connected == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
