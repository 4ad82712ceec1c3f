//! The gateway service: pages, WebSockets and the HTTP API, over NATS.
//!
//! Run with `gateway --nats-url nats://127.0.0.1:4222` (every flag also
//! reads its environment variable; see `--help`). This file only parses the
//! configuration and hands it to [`gateway::Gateway`].

use std::sync::Arc;

use anyhow::Context;
use gateway::Gateway;
use gateway::config::GatewayCli;
use services::admin::{AdminServer, Readiness};
use services::bus::nats::NatsBus;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: GatewayCli = services::config::parse();
    let _telemetry = services::telemetry::init(cli.log.log_format, "gateway");
    let shutdown = services::shutdown::on_signal().context("installing the signal handlers")?;
    let cfg = cli.config();
    let registry = prometheus::Registry::new();
    let readiness = Readiness::new();
    let admin = AdminServer::start(cli.admin_listen, registry.clone(), readiness.clone())
        .await
        .with_context(|| format!("binding the admin listener {}", cli.admin_listen))?;
    let bus = NatsBus::connect_with(
        &cli.nats_url,
        &format!("gateway-{}", cfg.gateway_id),
        &cli.nats.options(),
    )
    .await
    .context("connecting to NATS")?;
    bus.register_metrics(&registry)?;
    let gateway = Gateway::build(cfg, Arc::new(bus), &registry, readiness).await?;
    tracing::info!(addr = %gateway.local_addr(), "gateway listening");
    gateway.run(shutdown).await?;
    admin.stop().await;
    Ok(())
}
