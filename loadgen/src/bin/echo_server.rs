//! Run with `cargo run -p pingapp-loadgen --bin echo-server -- --listen 127.0.0.1:8001`.
//!
//! Parses the flags, binds, prints `listening on ADDR` once bound, and
//! serves [`loadgen::echo::EchoServer`] until SIGINT or SIGTERM (exit 0).

use anyhow::Context;
use clap::Parser;
use loadgen::echo::{EchoArgs, EchoServer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = EchoArgs::parse();
    // Installed before announcing the address, so no signal is missed.
    let shutdown = services::shutdown::signal().context("installing signal handlers")?;
    let server = EchoServer::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!(
        "listening on {}",
        server.local_addr().context("reading the bound address")?
    );
    server.run(shutdown).await;
    Ok(())
}
