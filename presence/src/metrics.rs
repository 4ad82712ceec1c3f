//! The presence metrics, all prefixed `pingapp_presence_`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use services::messages::{Broadcast, GatewayUpdate};
use services::metrics::{counter, gauge};

/// Every metric presence keeps.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub roster_size: IntGauge,
    pub gateways: IntGauge,
    pub events: IntCounterVec,
    pub broadcasts: IntCounterVec,
    pub heartbeats: IntCounter,
    pub stale_heartbeats: IntCounter,
    pub heartbeats_missed: IntCounter,
    pub expirations: IntCounter,
    pub expired_clients: IntCounter,
    pub active: IntGauge,
    pub bad_reports: IntCounter,
    pub refused: IntCounterVec,
    pub delay_flushes: IntCounterVec,
    pub sync_requests: IntCounter,
    pub broken_pieces: IntCounter,
    pub roster_pages: IntCounterVec,
}

impl Metrics {
    /// Registers the families in `registry`.
    ///
    /// # Panics
    /// A family of the same name is already registered there.
    pub fn register(registry: &Registry) -> Self {
        let single = |name: &str, help: &str| {
            counter(registry, name, help, &[]).with_label_values::<&str>(&[])
        };
        let level = |name: &str, help: &str| {
            gauge(registry, name, help, &[]).with_label_values::<&str>(&[])
        };
        Self {
            roster_size: level(
                "pingapp_presence_roster_size",
                "Public clients in the roster.",
            ),
            gateways: level(
                "pingapp_presence_gateways",
                "Gateways that report to presence.",
            ),
            events: counter(
                registry,
                "pingapp_presence_events_total",
                "Gateway reports received, by kind.",
                &["kind"],
            ),
            broadcasts: counter(
                registry,
                "pingapp_presence_broadcasts_total",
                "Broadcasts published, by kind.",
                &["kind"],
            ),
            heartbeats: single(
                "pingapp_presence_heartbeats_total",
                "Gateway heartbeats applied.",
            ),
            stale_heartbeats: single(
                "pingapp_presence_stale_heartbeats_total",
                "Gateway heartbeats ignored because a newer event was already applied.",
            ),
            heartbeats_missed: single(
                "pingapp_presence_heartbeats_missed_total",
                "Heartbeat intervals that passed without a gateway's heartbeat (approximate).",
            ),
            expirations: single(
                "pingapp_presence_expirations_total",
                "Gateways expired after missing their heartbeats.",
            ),
            expired_clients: single(
                "pingapp_presence_expired_clients_total",
                "Clients removed because their gateway expired.",
            ),
            active: level(
                "pingapp_presence_active",
                "1 while this replica holds the lease and publishes broadcasts.",
            ),
            bad_reports: single(
                "pingapp_presence_bad_reports_total",
                "Gateway reports that could not be decoded.",
            ),
            refused: {
                let v = counter(
                    registry,
                    "pingapp_presence_refused_total",
                    "Gateway reports (or entries of one) refused, by reason: subject (it names \
                     another gateway than its subject), foreign_client (it names another \
                     gateway's client), too_many_clients (over --max-clients-per-gateway).",
                    &["reason"],
                );
                for reason in ["subject", "foreign_client", "too_many_clients"] {
                    v.with_label_values(&[reason]);
                }
                v
            },
            delay_flushes: {
                let v = counter(
                    registry,
                    "pingapp_presence_delay_flushes_total",
                    "Roster ticks whose delay updates were published, by what released them: \
                     all_reported (every gateway closed the tick) or deadline (one was late).",
                    &["trigger"],
                );
                for trigger in ["all_reported", "deadline"] {
                    v.with_label_values(&[trigger]);
                }
                v
            },
            sync_requests: single(
                "pingapp_presence_sync_requests_total",
                "Full client lists asked of one gateway because its heartbeat's count or \
                 digest differed from the roster.",
            ),
            broken_pieces: single(
                "pingapp_presence_broken_pieces_total",
                "Full client lists dropped because a piece was missing or out of order.",
            ),
            roster_pages: {
                let v = counter(
                    registry,
                    "pingapp_presence_roster_pages_total",
                    "Roster requests answered, by kind: page (at most --max-roster-page \
                     clients) or whole (an older gateway's request without a limit).",
                    &["kind"],
                );
                for kind in ["page", "whole"] {
                    v.with_label_values(&[kind]);
                }
                v
            },
        }
    }
}

/// The `kind` label of a report.
pub(crate) fn update_kind(u: &GatewayUpdate) -> &'static str {
    match u {
        GatewayUpdate::Connect { .. } => "connect",
        GatewayUpdate::Rename { .. } => "rename",
        GatewayUpdate::Disconnect { .. } => "disconnect",
        GatewayUpdate::Delays { .. } => "delays",
        GatewayUpdate::Heartbeat { .. } => "heartbeat",
        GatewayUpdate::Clients { .. } => "clients",
        GatewayUpdate::Goodbye => "goodbye",
    }
}

/// The `kind` label of a broadcast.
pub(crate) fn broadcast_kind(b: &Broadcast) -> &'static str {
    match b {
        Broadcast::Connect { .. } => "connect",
        Broadcast::Rename { .. } => "rename",
        Broadcast::Disconnect { .. } => "disconnect",
        Broadcast::Delays { .. } => "delays",
        Broadcast::Snapshot { .. } => "snapshot",
        Broadcast::Digest { .. } => "digest",
    }
}
