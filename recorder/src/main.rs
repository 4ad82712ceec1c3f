//! The recorder service: persists every delay sample from NATS JetStream in
//! Postgres and answers history and statistics queries.
//!
//! Run with `cargo run -p pingapp-recorder -- --nats-url nats://127.0.0.1:4222
//! --database-url postgres://postgres@127.0.0.1/pingapp`. This file only
//! reads the configuration, connects the bus and the database, and hands
//! them to [`recorder::Recorder`].

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use services::admin::AdminServer;
use services::bus::SharedBus;
use services::bus::nats::NatsBus;
use services::config::{
    LogArgs, parse_duration, parse_nats_url, parse_postgres_url, parse_subject_prefix,
};

/// Command line and environment.
#[derive(Debug, Parser)]
#[command(name = "recorder", version, about)]
struct Args {
    /// Where /metrics, /livez and /readyz are served.
    #[arg(long, env = "PINGAPP_ADMIN_LISTEN", default_value = "0.0.0.0:9000")]
    admin_listen: std::net::SocketAddr,
    /// NATS server(s), comma-separated.
    #[arg(long, env = "NATS_URL", value_parser = parse_nats_url)]
    nats_url: String,
    /// The Postgres database.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_postgres_url)]
    database_url: String,
    /// First token of every subject (and of the stream name).
    #[arg(long, env = "PINGAPP_SUBJECT_PREFIX", default_value = "pingapp", value_parser = parse_subject_prefix)]
    subject_prefix: String,
    /// How long samples are kept (0: for ever).
    #[arg(long, env = "PINGAPP_RETENTION", default_value = "30d", value_parser = parse_duration)]
    retention: Duration,
    /// Samples per database insert, at most.
    #[arg(long, env = "PINGAPP_BATCH_MAX_SAMPLES", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    batch_max_samples: u32,
    /// How long a batch waits for more samples, ms.
    #[arg(long, env = "PINGAPP_BATCH_WAIT_MS", default_value_t = 50)]
    batch_wait_ms: u64,
    /// A sample batch delivered to a replica that neither acknowledged nor
    /// refused it (it was killed) goes to a replica again after this, ms.
    /// Applies when the durable consumer is created.
    #[arg(long, env = "PINGAPP_ACK_WAIT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    ack_wait_ms: u64,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = services::config::parse();
    let _telemetry = services::telemetry::init(args.log.log_format, "recorder");
    let shutdown = services::shutdown::on_signal();
    let registry = prometheus::Registry::new();
    let readiness = services::admin::Readiness::new();
    let admin = AdminServer::start(args.admin_listen, registry.clone(), readiness.clone())
        .await
        .with_context(|| format!("binding the admin listener {}", args.admin_listen))?;
    let bus = NatsBus::connect(&args.nats_url, "recorder")
        .await
        .context("connecting to NATS")?
        .with_ack_wait(Duration::from_millis(args.ack_wait_ms));
    let bus: SharedBus = std::sync::Arc::new(bus);
    let store =
        recorder::store::connect_retrying(&args.database_url, Duration::from_secs(60)).await?;
    let b = bus.clone();
    readiness.add_check("nats", move || b.is_connected());
    let mut cfg =
        recorder::RecorderConfig::new(services::subjects::Subjects::new(&args.subject_prefix));
    cfg.retention = args.retention;
    cfg.batch_max_samples = args.batch_max_samples as usize;
    cfg.batch_wait = Duration::from_millis(args.batch_wait_ms);
    let recorder = recorder::Recorder::build(cfg, bus, store, &registry, readiness.clone()).await?;
    readiness.set_started();
    let r = readiness.clone();
    let draining = shutdown.clone();
    tokio::spawn(async move {
        draining.cancelled().await;
        r.set_draining();
    });
    recorder.run(shutdown).await?;
    admin.stop().await;
    Ok(())
}
