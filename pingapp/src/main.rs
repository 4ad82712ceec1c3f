//! PingApp standalone: the whole product in one process.
//!
//! Run with `cargo run --release`, then open http://127.0.0.1:8000. Every
//! flag also reads its environment variable (`--help` lists them). This
//! file only parses the configuration and hands it to [`pingapp::run`].

use anyhow::Context;
use pingapp::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = services::config::parse();
    let _telemetry = services::telemetry::init(args.log.log_format, "pingapp");
    let shutdown = services::shutdown::on_signal().context("installing the signal handlers")?;
    pingapp::run(args, shutdown, |addr, admin| {
        // One line on stdout that scripts and tests wait for.
        println!("pingapp listening on http://{addr} (admin http://{admin})");
        tracing::info!(%addr, %admin, "pingapp ready");
    })
    .await
}
