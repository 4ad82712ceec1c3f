//! The recorder: consumes every delay sample from the durable stream
//! (a JetStream consumer shared by all replicas, or the in-memory bus of the
//! standalone binary), writes them to the [`store`] in batches, acknowledges
//! only after commit, and answers history, statistics and device
//! (a browser's own history, forgetting it) queries.
//!
//! [`Recorder::build`] sets everything up (stream, consumer, query
//! subscriptions, readiness check); [`Recorder::run`] works until the
//! shutdown token is cancelled, then finishes the batch in hand.
//!
//! ```no_run
//! # async fn demo(bus: services::bus::SharedBus) -> anyhow::Result<()> {
//! use recorder::{Recorder, RecorderConfig};
//! let store = recorder::store::connect("sqlite::memory:").await?;
//! let cfg = RecorderConfig::new(services::subjects::Subjects::new("pingapp"));
//! let readiness = services::admin::Readiness::new();
//! let registry = prometheus::Registry::new();
//! let recorder = Recorder::build(cfg, bus, store, &registry, readiness.clone()).await?;
//! assert_eq!(readiness.status(), Ok(()), "its latch is set once built");
//! recorder.run(tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```

mod config;
mod consumer;
mod metrics;
pub mod queries;
pub mod read_budget;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use services::admin::Readiness;
use services::bus::{Consumed, Inbox, SharedBus};
use services::messages::{
    DeviceHistoryQuery, DeviceHistoryReply, ForgetDeviceQuery, ForgetDeviceReply, RecordBatch,
    SamplesQuery, SamplesReply, StatsQuery, StatsReply,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::{RecorderCli, RecorderConfig};
use crate::consumer::Consumer;
use crate::metrics::Metrics;
use crate::queries::Responder;
use crate::store::Store;

/// The queue group the replicas answer queries in.
pub const QUEUE_GROUP: &str = "recorder";

/// How often the stream's fill is read into the metrics (and its settings
/// checked, which finishes a pending migration to a work queue).
const STREAM_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How often the database is pinged for readiness.
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the database is usable, for the synchronous readiness check:
/// the last ping answered, and inserts are not failing.
#[derive(Debug)]
pub(crate) struct DbHealth {
    ping_ok: AtomicBool,
    inserts_failing: AtomicBool,
}

impl DbHealth {
    fn new(ping_ok: bool) -> Self {
        Self {
            ping_ok: AtomicBool::new(ping_ok),
            inserts_failing: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.ping_ok.load(Ordering::Relaxed) && !self.inserts_failing.load(Ordering::Relaxed)
    }

    pub(crate) fn set_inserts_failing(&self, failing: bool) {
        self.inserts_failing.store(failing, Ordering::Relaxed);
    }
}

/// A built recorder, ready to [`run`](Recorder::run).
pub struct Recorder {
    cfg: RecorderConfig,
    bus: SharedBus,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    health: Arc<DbHealth>,
    deliveries: Consumed<RecordBatch>,
    samples_sub: Inbox<SamplesQuery, SamplesReply>,
    stats_sub: Inbox<StatsQuery, StatsReply>,
    device_history_sub: Inbox<DeviceHistoryQuery, DeviceHistoryReply>,
    forget_device_sub: Inbox<ForgetDeviceQuery, ForgetDeviceReply>,
}

impl Recorder {
    /// Creates the sample stream if missing, starts consuming it through the
    /// shared durable consumer, subscribes to the queries in queue group
    /// [`QUEUE_GROUP`], registers the metrics in `registry` and adds the
    /// readiness checks "nats" and "database". Registers the readiness
    /// latch "recorder" and sets it once built.
    ///
    /// # Errors
    /// The stream, consumer or subscriptions could not be set up.
    pub async fn build(
        cfg: RecorderConfig,
        bus: SharedBus,
        store: Arc<dyn Store>,
        registry: &prometheus::Registry,
        readiness: Readiness,
    ) -> anyhow::Result<Recorder> {
        let latch = readiness.latch("recorder");
        let subjects = &cfg.subjects;
        let stream = subjects.samples_stream();
        if let Err(e) = stream
            .ensure(&*bus, cfg.stream_max_age, cfg.stream_max_bytes)
            .await
        {
            // An old limits-retention stream is replaced only once drained,
            // which needs this recorder: consume it as it is (if it exists,
            // else the consumer below fails) and migrate later.
            tracing::warn!(error = %e, stream = stream.name(), "could not bring the stream to its settings; consuming it as it is");
        }
        let deliveries = stream
            .consume(&*bus, &subjects.recorder_durable())
            .await
            .with_context(|| format!("consuming the stream {}", stream.name()))?;
        let samples_sub = subjects
            .query_samples()
            .serve(&*bus, QUEUE_GROUP)
            .await
            .context("subscribing to history queries")?;
        let stats_sub = subjects
            .query_stats()
            .serve(&*bus, QUEUE_GROUP)
            .await
            .context("subscribing to statistics queries")?;
        let device_history_sub = subjects
            .query_device_history()
            .serve(&*bus, QUEUE_GROUP)
            .await
            .context("subscribing to device history queries")?;
        let forget_device_sub = subjects
            .forget_device()
            .serve(&*bus, QUEUE_GROUP)
            .await
            .context("subscribing to forget-device requests")?;
        let health = Arc::new(DbHealth::new(store.ping().await));
        let h = health.clone();
        readiness.add_check("database", move || h.is_up());
        let b = bus.clone();
        readiness.add_check("nats", move || b.is_connected());
        latch.set();
        Ok(Recorder {
            metrics: Arc::new(Metrics::new(registry)),
            cfg,
            bus,
            store,
            health,
            deliveries,
            samples_sub,
            stats_sub,
            device_history_sub,
            forget_device_sub,
        })
    }

    /// Consumes, answers queries and prunes until `shutdown` is cancelled;
    /// then stops taking deliveries and queries, commits and acknowledges
    /// the batch in hand, waits for the answers in flight, and returns.
    ///
    /// # Errors
    /// None so far: failures of the bus or the database are retried.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let stop = shutdown.child_token();
        let responder = Responder {
            bus: self.bus.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            reads: Arc::new(tokio::sync::Semaphore::new(self.cfg.read_concurrency)),
        };
        tracker.spawn(
            responder
                .clone()
                .serve(self.samples_sub, stop.clone(), tracker.clone()),
        );
        tracker.spawn(
            responder
                .clone()
                .serve(self.stats_sub, stop.clone(), tracker.clone()),
        );
        tracker.spawn(responder.clone().serve(
            self.device_history_sub,
            stop.clone(),
            tracker.clone(),
        ));
        tracker.spawn(responder.serve(self.forget_device_sub, stop.clone(), tracker.clone()));
        tracker.spawn(stream_loop(
            self.bus.clone(),
            self.cfg.clone(),
            self.metrics.clone(),
            stop.clone(),
        ));
        tracker.spawn(ping_loop(
            self.store.clone(),
            self.health.clone(),
            stop.clone(),
        ));
        tracker.spawn(maintenance_loop(
            self.store.clone(),
            self.metrics.clone(),
            Retention {
                samples: self.cfg.retention,
                rollups: self.cfg.rollup_retention,
            },
            self.cfg.prune_interval,
            stop.clone(),
        ));
        let consumer = Arc::new(Consumer {
            bus: self.bus,
            subjects: self.cfg.subjects.clone(),
            stream: self.cfg.subjects.samples_stream(),
            durable: self.cfg.subjects.recorder_durable(),
            store: self.store,
            metrics: self.metrics,
            health: self.health,
            batch_max_samples: self.cfg.batch_max_samples,
            batch_wait: self.cfg.batch_wait,
        });
        consumer.run(self.deliveries, shutdown).await;
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

/// Keeps the stream gauges fresh and the stream at its settings (which
/// replaces a drained old limits-retention stream by the work queue).
async fn stream_loop(
    bus: SharedBus,
    cfg: RecorderConfig,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let stream = cfg.subjects.samples_stream();
    let mut tick = tokio::time::interval(STREAM_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let check = async {
            if let Err(e) = stream
                .ensure(&*bus, cfg.stream_max_age, cfg.stream_max_bytes)
                .await
            {
                tracing::warn!(error = %e, "the sample stream is not at its settings yet");
            }
            match stream.state(&*bus).await {
                Ok(state) => {
                    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    metrics.stream_messages.set(gauge(state.messages));
                    metrics.stream_bytes.set(gauge(state.bytes));
                    metrics.stream_max_bytes.set(gauge(state.max_bytes));
                }
                Err(e) => tracing::debug!(error = %e, "could not read the sample stream's state"),
            }
        };
        // With NATS down the requests wait for the reconnect: never hold
        // the drain for them.
        tokio::select! {
            () = stop.cancelled() => return,
            () = check => {}
        }
    }
}

/// Keeps the readiness check's view of the database fresh.
async fn ping_loop(store: Arc<dyn Store>, health: Arc<DbHealth>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = store.ping().await;
        if ok != health.ping_ok.swap(ok, Ordering::Relaxed) {
            if ok {
                tracing::info!("database reachable again");
            } else {
                tracing::warn!("database unreachable");
            }
        }
    }
}

/// How long samples and rollups are kept (zero: for ever).
struct Retention {
    samples: Duration,
    rollups: Duration,
}

/// How long after a block's end its samples are packed: batches still on
/// their way (the gateways' batching, a recorder's retries) arrive in the
/// meantime and are staged, not merged into a packed block.
pub const PACK_DELAY: Duration = Duration::from_secs(60);

/// Every `interval`: creates the partitions the next days need, folds the
/// room's partial minute rollups into its tiers, packs the staged samples
/// of blocks that ended [`PACK_DELAY`] ago, and deletes samples older than
/// the retention (zero: none).
async fn maintenance_loop(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    Retention {
        samples: retention,
        rollups,
    }: Retention,
    interval: Duration,
    stop: CancellationToken,
) {
    let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    let interval = if interval.is_zero() {
        Duration::from_secs(60)
    } else {
        interval
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = services::unix_us();
        match store.maintain_partitions(now, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(partitions = n, "created partitions of packed samples"),
            Err(e) => tracing::warn!(error = %e, "creating partitions failed; trying again later"),
        }
        match store.fold_room_parts().await {
            Ok(n) => metrics.room_parts_folded.inc_by(n),
            Err(e) => tracing::warn!(error = %e, "folding room rollups failed; trying again later"),
        }
        let before = store::block::block_of(now.saturating_sub(us(PACK_DELAY)));
        let started = std::time::Instant::now();
        match store.pack(before).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.packed.inc_by(n);
                tracing::debug!(
                    samples = n,
                    seconds = started.elapsed().as_secs_f64(),
                    "packed samples"
                );
            }
            Err(e) => tracing::warn!(error = %e, "packing failed; trying again later"),
        }
        if !rollups.is_zero() {
            match store.prune_rollups(now.saturating_sub(us(rollups))).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics.rollups_pruned.inc_by(n);
                    tracing::info!(minutes = n, "pruned rollups past retention");
                }
                Err(e) => tracing::warn!(error = %e, "pruning rollups failed; trying again later"),
            }
        }
        if retention.is_zero() {
            continue;
        }
        match store.prune(now.saturating_sub(us(retention))).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.pruned.inc_by(n);
                tracing::info!(samples = n, "pruned samples past retention");
            }
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again later"),
        }
    }
}
