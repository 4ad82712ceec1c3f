//! The recorder's Prometheus families, all prefixed `pingapp_recorder_`.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use services::metrics::{BATCH_SIZES, FAST_SECONDS, counter, gauge, histogram};

const NO_LABELS: &[&str] = &[];

/// Every metric the recorder updates.
pub(crate) struct Metrics {
    /// New samples committed.
    pub samples_persisted: IntCounter,
    /// Samples that were already stored (redelivered or re-sent batches).
    pub duplicates: IntCounter,
    /// Record batches (bus messages) committed.
    pub batches: IntCounter,
    /// Samples per store insert.
    pub batch_size: Histogram,
    /// Time of successful store inserts.
    pub insert_duration: Histogram,
    /// Store inserts that failed.
    pub database_errors: IntCounter,
    /// Deliveries the stream had delivered before.
    pub redeliveries: IntCounter,
    /// Deliveries that were not a record batch (acknowledged and dropped).
    pub undecodable: IntCounter,
    /// Record batches the database refused as invalid data (dropped).
    pub rejected: IntCounter,
    /// Deliveries received and not yet acknowledged.
    pub consumer_pending: IntGauge,
    /// Samples deleted by retention.
    pub pruned: IntCounter,
    /// Records refused because they name another gateway than the one
    /// that published them, by reason (docs/security.md, "The bus").
    pub foreign: IntCounterVec,
    /// Samples moved from staging into packed blocks.
    pub packed: IntCounter,
    /// The room's partial minute rollups folded into its tiers
    /// (docs/architecture.md, "Rollups").
    pub room_parts_folded: IntCounter,
    /// Minute rollup rows (the room's and the devices') deleted by
    /// `--rollup-retention`.
    pub rollups_pruned: IntCounter,
    /// History, statistics and device queries by kind and outcome.
    pub queries: IntCounterVec,
    /// Messages in the durable stream (not yet acknowledged).
    pub stream_messages: IntGauge,
    /// Their bytes.
    pub stream_bytes: IntGauge,
    /// The stream's byte cap.
    pub stream_max_bytes: IntGauge,
}

impl Metrics {
    /// Registers the families in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let c = |name: &str, help: &str| {
            counter(
                registry,
                &format!("pingapp_recorder_{name}"),
                help,
                NO_LABELS,
            )
            .with_label_values(NO_LABELS)
        };
        let h = |name: &str, help: &str, buckets: &[f64]| {
            histogram(
                registry,
                &format!("pingapp_recorder_{name}"),
                help,
                NO_LABELS,
                buckets,
            )
            .with_label_values(NO_LABELS)
        };
        let g = |name: &str, help: &str| {
            gauge(
                registry,
                &format!("pingapp_recorder_{name}"),
                help,
                NO_LABELS,
            )
            .with_label_values(NO_LABELS)
        };
        let metrics = Self {
            samples_persisted: c(
                "samples_persisted_total",
                "New samples committed to the database.",
            ),
            duplicates: c(
                "duplicates_total",
                "Samples delivered again that were already stored.",
            ),
            batches: c("batches_total", "Record batches (bus messages) committed."),
            batch_size: h("batch_size", "Samples per database insert.", BATCH_SIZES),
            insert_duration: h(
                "insert_duration_seconds",
                "Duration of successful database inserts.",
                FAST_SECONDS,
            ),
            database_errors: c("database_errors_total", "Database inserts that failed."),
            redeliveries: c(
                "redeliveries_total",
                "Deliveries that the stream had delivered before.",
            ),
            undecodable: c(
                "undecodable_total",
                "Stream messages that were not a record batch (acknowledged and dropped).",
            ),
            rejected: c(
                "rejected_total",
                "Record batches the database refused as invalid data (acknowledged and dropped).",
            ),
            consumer_pending: gauge(
                registry,
                "pingapp_recorder_consumer_pending",
                "Deliveries received and not yet acknowledged.",
                NO_LABELS,
            )
            .with_label_values(NO_LABELS),
            pruned: c("pruned_total", "Samples deleted by retention."),
            packed: c(
                "packed_total",
                "Samples moved from staging rows into packed blocks.",
            ),
            room_parts_folded: c(
                "room_parts_folded_total",
                "Partial minute rollups of the public room (one per insert and minute) folded into its rollup tiers.",
            ),
            rollups_pruned: c(
                "rollups_pruned_total",
                "Minute rollup rows (public room and devices) deleted by --rollup-retention.",
            ),
            foreign: counter(
                registry,
                "pingapp_recorder_foreign_records_total",
                "Records refused because they speak for another gateway's clients: `batch` (samples of a batch naming another gateway than its subject), `client` (client records naming another gateway than their batch), `sample` (samples of another gateway's client).",
                &["kind"],
            ),
            queries: counter(
                registry,
                "pingapp_recorder_queries_total",
                "History, statistics and device queries answered, by kind and outcome.",
                &["kind", "outcome"],
            ),
            stream_messages: g(
                "stream_messages",
                "Record batches in the durable stream not yet stored and acknowledged.",
            ),
            stream_bytes: g(
                "stream_bytes",
                "Bytes of the durable stream's messages not yet stored and acknowledged.",
            ),
            stream_max_bytes: g(
                "stream_max_bytes",
                "The durable stream's byte cap; at the cap it refuses new batches.",
            ),
        };
        // Exposed at zero from the start, as every documented family is.
        for kind in ["batch", "client", "sample"] {
            metrics.foreign.with_label_values(&[kind]);
        }
        metrics
    }

    /// Counts one query.
    pub fn query(&self, kind: &str, outcome: &str) {
        self.queries.with_label_values(&[kind, outcome]).inc();
    }
}
