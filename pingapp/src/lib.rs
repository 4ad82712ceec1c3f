//! PingApp standalone: gateway, presence and recorder in one process, over
//! the in-memory bus (or NATS) with SQLite (or Postgres) storage. The same
//! libraries as the distributed services; only the injected bus and store
//! differ.

mod config;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use gateway::{Gateway, GatewayConfig};
use presence::{Presence, PresenceConfig};
use recorder::{Recorder, RecorderConfig};
use services::admin::{AdminServer, Readiness};
use services::bus::SharedBus;
use services::bus::memory::MemoryBus;
use services::bus::nats::NatsBus;
use services::subjects::Subjects;
use tokio_util::sync::CancellationToken;

pub use config::Args;

/// Runs the whole product until `shutdown` is cancelled, then drains in
/// order: the gateway first (clients closed, samples flushed to the bus),
/// then presence and the recorder (which stores what the gateway flushed).
/// `on_ready` gets the bound addresses (public, admin).
///
/// # Errors
/// A listener cannot be bound, or the bus or database cannot be reached.
pub async fn run(
    args: Args,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr, SocketAddr),
) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let readiness = Readiness::new();
    // Not ready until every part is built, whichever is built first.
    let all_built = readiness.latch("pingapp");
    let admin = AdminServer::start(args.admin_listen, registry.clone(), readiness.clone())
        .await
        .with_context(|| format!("binding admin listener {}", args.admin_listen))?;
    let admin_addr = admin.local_addr();

    let bus: SharedBus = match &args.nats_url {
        Some(url) => {
            let bus = NatsBus::connect_with(url, "pingapp", &args.nats.options())
                .await
                .context("connecting to NATS")?;
            bus.register_metrics(&registry)?;
            Arc::new(bus)
        }
        None => Arc::new(MemoryBus::new()),
    };
    let store = recorder::store::connect(&args.database_url)
        .await
        .with_context(|| format!("opening the database {}", args.database_url))?;
    let subjects = Subjects::new(&args.subject_prefix);

    let mut recorder_cfg = RecorderConfig::new(subjects.clone());
    recorder_cfg.retention = args.retention;
    recorder_cfg.stream_max_bytes = args.gateway.stream_max_bytes;
    let recorder = Recorder::build(
        recorder_cfg,
        bus.clone(),
        store,
        &registry,
        readiness.clone(),
    )
    .await?;
    let mut presence_cfg = PresenceConfig::new(subjects.clone());
    presence_cfg.roster_tick = args.gateway.roster_tick();
    if args.nats_url.is_none() {
        // Alone on an in-memory bus there is nobody to wait for.
        presence_cfg.warmup = std::time::Duration::ZERO;
    }
    let presence = Presence::build(presence_cfg, bus.clone(), &registry, readiness.clone()).await?;
    let gateway = Gateway::build(
        GatewayConfig {
            args: args.gateway,
            gateway_id: args.gateway_id,
            subjects,
            listen: args.listen,
        },
        bus,
        &registry,
        readiness.clone(),
    )
    .await?;
    all_built.set();
    on_ready(gateway.local_addr(), admin_addr);

    let backend = CancellationToken::new();
    let recorder = tokio::spawn(recorder.run(backend.clone()));
    let presence = tokio::spawn(presence.run(backend.clone()));
    let served = gateway.run(shutdown).await;
    backend.cancel();
    let (r, p) = tokio::join!(recorder, presence);
    admin.stop().await;
    served?;
    r.context("recorder task")??;
    p.context("presence task")??;
    Ok(())
}
