//! The gateway service: pages, WebSockets and the HTTP API, over NATS.
//!
//! Run with `gateway --nats-url nats://127.0.0.1:4222` (every flag also
//! reads its environment variable; see `--help`). This file only parses the
//! configuration and hands it to [`gateway::Gateway`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use gateway::{Gateway, GatewayArgs, GatewayConfig};
use services::admin::{AdminServer, Readiness};
use services::bus::nats::NatsBus;
use services::config::{LogArgs, parse, parse_nats_url, parse_subject_prefix};
use services::subjects::Subjects;

/// Command-line flags.
#[derive(Parser)]
#[command(version, about = "PingApp WebSocket gateway")]
struct Args {
    /// Where browsers connect.
    #[arg(long, env = "PINGAPP_LISTEN", default_value = "0.0.0.0:8000")]
    listen: SocketAddr,
    /// The admin listener (/metrics, /livez, /readyz).
    #[arg(long, env = "PINGAPP_ADMIN_LISTEN", default_value = "0.0.0.0:9000")]
    admin_listen: SocketAddr,
    /// NATS server(s).
    #[arg(long, env = "NATS_URL", value_parser = parse_nats_url)]
    nats_url: String,
    /// This gateway's id (default: the host name).
    #[arg(long, env = "PINGAPP_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// Prefix of every NATS subject.
    #[arg(long, env = "PINGAPP_SUBJECT_PREFIX", default_value = "pingapp", value_parser = parse_subject_prefix)]
    subject_prefix: String,
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = parse();
    let _telemetry = services::telemetry::init(args.log.log_format, "gateway");
    let gateway_id = args.gateway_id.unwrap_or_else(services::config::host_name);
    let registry = prometheus::Registry::new();
    let readiness = Readiness::new();
    let shutdown = services::shutdown::on_signal();
    let admin = AdminServer::start(args.admin_listen, registry.clone(), readiness.clone())
        .await
        .with_context(|| format!("binding admin listener {}", args.admin_listen))?;
    let bus = NatsBus::connect(&args.nats_url, &format!("gateway-{gateway_id}")).await?;
    let cfg = GatewayConfig {
        args: args.gateway,
        gateway_id,
        subjects: Subjects::new(&args.subject_prefix),
        listen: args.listen,
    };
    let gateway = Gateway::build(cfg, Arc::new(bus), &registry, readiness).await?;
    tracing::info!(addr = %gateway.local_addr(), "gateway listening");
    gateway.run(shutdown).await?;
    admin.stop().await;
    Ok(())
}
