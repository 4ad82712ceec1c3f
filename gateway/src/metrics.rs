//! The gateway's Prometheus families (documented in `docs/metrics.md`).

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec, Registry};
use services::metrics::{DELAY_SECONDS, FAST_SECONDS, counter, gauge, histogram};

/// Every family the gateway exports.
#[derive(Clone)]
pub struct GatewayMetrics {
    /// Open connections by page and protocol version.
    pub connections: IntGaugeVec,
    /// Accepted connections by page and version.
    pub connects: IntCounterVec,
    /// Closed connections by close code.
    pub disconnects: IntCounterVec,
    /// Pings answered by version.
    pub pings: IntCounterVec,
    /// Time from receiving a ping to having written its pong.
    pub ping_duration: HistogramVec,
    /// Client-reported delays.
    pub client_delay: HistogramVec,
    /// Server-measured keepalive round trips.
    pub server_rtt: HistogramVec,
    /// Frames received by command.
    pub messages_in: IntCounterVec,
    /// Frames sent by command.
    pub messages_out: IntCounterVec,
    /// Error frames sent, by code.
    pub errors: IntCounterVec,
    /// Clients dropped because their outbound queue overflowed.
    pub outbound_drops: IntCounterVec,
    /// Time to hand one broadcast to every local client.
    pub broadcast_fanout: HistogramVec,
    /// Samples handed to the durable stream.
    pub samples_persisted: IntCounterVec,
    /// Failed attempts to persist a batch (retried).
    pub persist_errors: IntCounterVec,
    /// Samples accepted but not yet persisted.
    pub samples_pending: IntGaugeVec,
    /// Bytes of accepted records not yet stored.
    pub persist_buffer_bytes: IntGaugeVec,
    /// The bound of that buffer.
    pub persist_buffer_max_bytes: IntGaugeVec,
    /// Public clients in this gateway's copy of the roster.
    pub roster_size: IntGaugeVec,
    /// Requests refused before they were served (WebSocket upgrades and
    /// API requests), by reason.
    pub refused: IntCounterVec,
    /// `delay_time` samples refused, by reason: no unused pong,
    /// implausible, or the persist buffer at its bound.
    pub samples_refused: IntCounterVec,
    /// Distinct views of the v2 public pages (each computed and serialized
    /// once per tick).
    pub views: IntGaugeVec,
    /// Time to compute, serialize and queue one tick's view frames.
    pub view_tick: HistogramVec,
    /// Time from a tick's start to its last page's frame queued (the
    /// paced fan-out, `--view-fanout-spread-ms`).
    pub view_fanout: HistogramVec,
    /// The connection caps, by kind (`connections`, `public`,
    /// `v1_public`).
    pub connection_cap: IntGaugeVec,
    /// Whole-roster fetches from presence, by trigger (`start`, or
    /// `digest`: presence's roster digest differed from the copy).
    pub roster_fetches: IntCounterVec,
    /// Full client lists sent to presence at its request, and their pieces.
    pub presence_lists: IntCounterVec,
}

impl GatewayMetrics {
    /// Registers every family in `r`.
    pub fn new(r: &Registry) -> Self {
        let m = Self::register(r);
        // Children exist (at zero) before their first event, so dashboards
        // and alerts see every series from the start.
        let none: &[&str] = &[];
        for family in [&m.outbound_drops, &m.samples_persisted, &m.persist_errors] {
            family.with_label_values(none);
        }
        m.samples_pending.with_label_values(none);
        m.persist_buffer_bytes.with_label_values(none);
        m.persist_buffer_max_bytes.with_label_values(none);
        m.roster_size.with_label_values(none);
        for trigger in ["start", "digest"] {
            m.roster_fetches.with_label_values(&[trigger]);
        }
        for kind in ["lists", "pieces"] {
            m.presence_lists.with_label_values(&[kind]);
        }
        for reason in [
            "origin",
            "ip_connections",
            "ip_rate",
            "ip_table",
            "api_rate",
            "max_connections",
            "max_public_clients",
            "max_v1_public_clients",
        ] {
            m.refused.with_label_values(&[reason]);
        }
        for reason in ["no_pong", "implausible", "buffer_full", "queue_full"] {
            m.samples_refused.with_label_values(&[reason]);
        }
        m.ping_duration.with_label_values(none);
        m.server_rtt.with_label_values(none);
        m.broadcast_fanout.with_label_values(none);
        m.views.with_label_values(none);
        m.view_tick.with_label_values(none);
        m.view_fanout.with_label_values(none);
        for code in ["1000", "1001", "1008", "1009", "1012", "1013"] {
            m.disconnects.with_label_values(&[code]);
        }
        for code in [
            "bad_json",
            "unknown_command",
            "bad_delay",
            "bad_name",
            "bad_sample",
            "bad_view",
            "too_many_renames",
            "busy",
            "bad_device",
        ] {
            m.errors.with_label_values(&[code]);
        }
        for page in ["private", "public"] {
            m.client_delay.with_label_values(&[page]);
            for version in ["1", "2"] {
                m.connections.with_label_values(&[page, version]);
                m.connects.with_label_values(&[page, version]);
            }
        }
        m
    }

    fn register(r: &Registry) -> Self {
        Self {
            connections: gauge(
                r,
                "pingapp_gateway_connections",
                "Open WebSocket connections.",
                &["page", "version"],
            ),
            connects: counter(
                r,
                "pingapp_gateway_connects_total",
                "Accepted WebSocket connections.",
                &["page", "version"],
            ),
            disconnects: counter(
                r,
                "pingapp_gateway_disconnects_total",
                "Closed WebSocket connections by close code.",
                &["code"],
            ),
            pings: counter(
                r,
                "pingapp_gateway_pings_total",
                "Pings answered.",
                &["version"],
            ),
            ping_duration: histogram(
                r,
                "pingapp_gateway_ping_duration_seconds",
                "Time from receiving a ping to having written its pong.",
                &[],
                FAST_SECONDS,
            ),
            client_delay: histogram(
                r,
                "pingapp_gateway_client_delay_seconds",
                "Delays reported by clients.",
                &["page"],
                DELAY_SECONDS,
            ),
            server_rtt: histogram(
                r,
                "pingapp_gateway_server_rtt_seconds",
                "Round trip of WebSocket keepalive pings.",
                &[],
                DELAY_SECONDS,
            ),
            messages_in: counter(
                r,
                "pingapp_gateway_messages_in_total",
                "Client frames received by command.",
                &["command"],
            ),
            messages_out: counter(
                r,
                "pingapp_gateway_messages_out_total",
                "Frames sent to clients by command.",
                &["command"],
            ),
            errors: counter(
                r,
                "pingapp_gateway_errors_total",
                "Error frames sent to clients by code.",
                &["code"],
            ),
            outbound_drops: counter(
                r,
                "pingapp_gateway_outbound_drops_total",
                "Clients dropped because their outbound queue overflowed.",
                &[],
            ),
            broadcast_fanout: histogram(
                r,
                "pingapp_gateway_broadcast_fanout_seconds",
                "Time to hand one broadcast to every local client.",
                &[],
                FAST_SECONDS,
            ),
            samples_persisted: counter(
                r,
                "pingapp_gateway_samples_persisted_total",
                "Samples stored in the durable stream.",
                &[],
            ),
            persist_errors: counter(
                r,
                "pingapp_gateway_persist_errors_total",
                "Failed attempts to store a batch (retried).",
                &[],
            ),
            samples_pending: gauge(
                r,
                "pingapp_gateway_samples_pending",
                "Samples accepted but not yet stored.",
                &[],
            ),
            persist_buffer_bytes: gauge(
                r,
                "pingapp_gateway_persist_buffer_bytes",
                "Bytes of accepted records not yet stored in the durable stream.",
                &[],
            ),
            persist_buffer_max_bytes: gauge(
                r,
                "pingapp_gateway_persist_buffer_max_bytes",
                "The bound of that buffer (--persist-buffer-bytes).",
                &[],
            ),
            roster_size: gauge(
                r,
                "pingapp_gateway_roster_size",
                "Public clients in this gateway's copy of the roster.",
                &[],
            ),
            roster_fetches: counter(
                r,
                "pingapp_gateway_roster_fetches_total",
                "Whole-roster fetches from presence (in pages of --presence-piece-clients), by \
                 trigger: start, or digest (presence's roster digest differed from the copy).",
                &["trigger"],
            ),
            presence_lists: counter(
                r,
                "pingapp_gateway_presence_lists_total",
                "Full client lists sent to presence at its request (kind lists), and their \
                 pieces of at most --presence-piece-clients clients (kind pieces).",
                &["kind"],
            ),
            refused: counter(
                r,
                "pingapp_gateway_refused_total",
                "Requests refused before they were served (WebSocket upgrades and API requests), by reason.",
                &["reason"],
            ),
            samples_refused: counter(
                r,
                "pingapp_gateway_samples_refused_total",
                "Delay samples refused: no unused pong, longer than the time since its ping, or the buffer of records not yet stored at its bound (error frame busy).",
                &["reason"],
            ),
            views: gauge(
                r,
                "pingapp_gateway_views",
                "Distinct views of the v2 public pages (each computed and serialized once per tick).",
                &[],
            ),
            view_tick: histogram(
                r,
                "pingapp_gateway_view_tick_seconds",
                "Time to compute and serialize one roster tick's view frames (queueing them is pingapp_gateway_view_fanout_seconds).",
                &[],
                FAST_SECONDS,
            ),
            view_fanout: histogram(
                r,
                "pingapp_gateway_view_fanout_seconds",
                "Time from a roster tick's start to its last page's view frame queued (paced over --view-fanout-spread-ms).",
                &[],
                FAST_SECONDS,
            ),
            connection_cap: gauge(
                r,
                "pingapp_gateway_connection_cap",
                "The connection caps: connections (--max-connections), public (--max-public-clients), v1_public (--max-v1-public-clients).",
                &["kind"],
            ),
        }
    }
}
