//! Run with `cargo run -p pingapp-presence -- --nats-url nats://127.0.0.1:4222`.
//!
//! Parses the settings, connects to NATS and hands over to
//! [`presence::Presence`]; the admin listener serves metrics and probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use presence::{Presence, PresenceConfig, default_replica_id};
use services::admin::{AdminServer, Readiness};
use services::bus::nats::NatsBus;
use services::config::{LogArgs, parse_nats_url, parse_subject_prefix};
use services::subjects::Subjects;

/// PingApp presence: the public roster across all gateways.
#[derive(Parser)]
#[command(name = "presence", version, about)]
struct Args {
    /// Admin listener: /metrics, /livez, /readyz.
    #[arg(long, env = "PINGAPP_ADMIN_LISTEN", default_value = "0.0.0.0:9000")]
    admin_listen: SocketAddr,
    /// NATS server(s), comma-separated.
    #[arg(long, env = "NATS_URL", value_parser = parse_nats_url)]
    nats_url: String,
    /// First token of every subject.
    #[arg(long, env = "PINGAPP_SUBJECT_PREFIX", default_value = "pingapp", value_parser = parse_subject_prefix)]
    subject_prefix: String,
    /// How often coalesced delay updates are published, ms.
    #[arg(long, env = "PINGAPP_ROSTER_TICK_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    roster_tick_ms: u64,
    /// This replica's name in the leader lease (default: host name and pid).
    #[arg(long, env = "PINGAPP_REPLICA_ID")]
    replica_id: Option<String>,
    /// The leader lease lapses this long after its last renewal, ms.
    #[arg(long, env = "PINGAPP_LEASE_TTL_MS", default_value_t = 6000, value_parser = clap::value_parser!(u64).range(300..))]
    lease_ttl_ms: u64,
    /// After start, clients learned from heartbeats are added silently for
    /// this long (the pages still have them), ms. Set it a little above the
    /// gateways' heartbeat interval.
    #[arg(long, env = "PINGAPP_WARMUP_MS", default_value_t = 2500, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    warmup_ms: u64,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = services::config::parse();
    let _telemetry = services::telemetry::init(args.log.log_format, "presence");
    let shutdown = services::shutdown::on_signal();
    let registry = prometheus::Registry::new();
    let readiness = Readiness::new();
    let admin = AdminServer::start(args.admin_listen, registry.clone(), readiness.clone())
        .await
        .with_context(|| format!("binding the admin listener {}", args.admin_listen))?;
    let bus = NatsBus::connect(&args.nats_url, "presence")
        .await
        .context("connecting to NATS")?;

    let mut cfg = PresenceConfig::new(Subjects::new(&args.subject_prefix));
    cfg.replica_id = args.replica_id.unwrap_or_else(default_replica_id);
    cfg.roster_tick = Duration::from_millis(args.roster_tick_ms);
    cfg.lease_ttl = Duration::from_millis(args.lease_ttl_ms);
    cfg.warmup = Duration::from_millis(args.warmup_ms);
    let presence = Presence::build(cfg, Arc::new(bus), &registry, readiness.clone()).await?;
    readiness.set_started();

    // Presence stops at once on the signal; readiness turns 503 right after.
    presence.run(shutdown).await?;
    readiness.set_draining();
    admin.stop().await;
    Ok(())
}
