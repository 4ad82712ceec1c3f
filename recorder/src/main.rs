//! The recorder service: persists every delay sample from NATS JetStream in
//! Postgres and answers history and statistics queries.
//!
//! Run with `cargo run -p pingapp-recorder -- --nats-url nats://127.0.0.1:4222
//! --database-url postgres://postgres@127.0.0.1/pingapp`. This file only
//! reads the configuration, connects the bus and the database, and hands
//! them to [`recorder::Recorder`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use recorder::{Recorder, RecorderCli};
use services::admin::{AdminServer, Readiness};
use services::bus::nats::NatsBus;

/// How long the recorder waits for its database at start-up.
const DATABASE_PATIENCE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: RecorderCli = services::config::parse();
    let _telemetry = services::telemetry::init(args.log.log_format, "recorder");
    let migrate_url = args.migrate_database_url.as_deref();
    if args.migrate_only {
        let url = migrate_url.unwrap_or(&args.database_url);
        recorder::store::migrate_retrying(url, DATABASE_PATIENCE).await?;
        tracing::info!("migrations applied");
        return Ok(());
    }
    let nats_url = args
        .nats_url
        .as_deref()
        .context("--nats-url (NATS_URL) is required")?;
    let shutdown = services::shutdown::on_signal().context("installing the signal handlers")?;
    let registry = prometheus::Registry::new();
    let readiness = Readiness::new();
    let admin = AdminServer::start(args.admin_listen, registry.clone(), readiness.clone())
        .await
        .with_context(|| format!("binding the admin listener {}", args.admin_listen))?;
    let bus = NatsBus::connect_with(nats_url, "recorder", &args.nats.options())
        .await
        .context("connecting to NATS")?
        .with_ack_wait(args.ack_wait());
    bus.register_metrics(&registry)?;
    let store = recorder::store::connect_retrying(
        &args.database_url,
        migrate_url,
        DATABASE_PATIENCE,
        args.read_limits(),
    )
    .await?;
    let recorder = Recorder::build(
        args.config(),
        Arc::new(bus),
        store,
        &registry,
        readiness.clone(),
    )
    .await?;
    readiness.drain_on(&shutdown);
    recorder.run(shutdown).await?;
    admin.stop().await;
    Ok(())
}
