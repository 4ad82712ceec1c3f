//! Run with `cargo run -p pingapp-loadgen --bin loadgen -- ws://127.0.0.1:8000 --clients 100 --duration 10s`.
//!
//! Parses the flags, runs [`loadgen::run`] until the duration is over (or
//! SIGINT/SIGTERM), and prints the summary. Exit status: 0, or 1 when no
//! client could connect, or 2 for a bad flag.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match loadgen::Args::parse().into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("loadgen: {error}");
            return ExitCode::from(2);
        }
    };
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
