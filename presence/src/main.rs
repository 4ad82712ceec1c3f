//! Run with `cargo run -p pingapp-presence -- --nats-url nats://127.0.0.1:4222`.
//!
//! Parses the settings, connects to NATS and hands over to
//! [`presence::Presence`]; the admin listener serves metrics and probes.

use std::sync::Arc;

use anyhow::Context;
use presence::{Presence, PresenceCli};
use services::admin::{AdminServer, Readiness};
use services::bus::nats::NatsBus;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: PresenceCli = services::config::parse();
    let _telemetry = services::telemetry::init(cli.log.log_format, "presence");
    let shutdown = services::shutdown::on_signal().context("installing the signal handlers")?;
    let registry = prometheus::Registry::new();
    let readiness = Readiness::new();
    let admin = AdminServer::start(cli.admin_listen, registry.clone(), readiness.clone())
        .await
        .with_context(|| format!("binding the admin listener {}", cli.admin_listen))?;
    let bus = NatsBus::connect_with(&cli.nats_url, "presence", &cli.nats.options())
        .await
        .context("connecting to NATS")?;
    bus.register_metrics(&registry)?;
    let presence =
        Presence::build(cli.config(), Arc::new(bus), &registry, readiness.clone()).await?;
    // Presence stops at once on the signal; readiness turns 503 with it.
    readiness.drain_on(&shutdown);
    presence.run(shutdown).await?;
    admin.stop().await;
    Ok(())
}
