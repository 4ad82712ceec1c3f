//! The presence service: the [`Roster`] wired to the bus, the clock and the
//! leader lease.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use services::admin::Readiness;
use services::bus::{Inbox, Incoming, SharedBus};
use services::messages::{Broadcast, GatewayReport, HeartbeatRequest, RosterReply, RosterRequest};
use services::subjects::Subjects;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::lease;
use crate::metrics::{Metrics, broadcast_kind, update_kind};
use crate::roster::{Outcome, Refusal, Roster};

/// How often silent gateways are looked for.
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// Default of the most clients in one roster reply page
/// (`presence --max-roster-page`): some 150 KB of JSON.
pub const DEFAULT_MAX_ROSTER_PAGE: usize = 1000;

/// The queue group of the roster request subscribers.
const QUEUE: &str = "presence";

/// How presence runs.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// The deployment's subjects.
    pub subjects: Subjects,
    /// This replica's name in the leader lease; unique per replica.
    pub replica_id: String,
    /// How often coalesced delay updates are published.
    pub roster_tick: Duration,
    /// How long after start clients learned from heartbeats are added
    /// without a connect broadcast (the pages already have them).
    pub warmup: Duration,
    /// The leader lease lapses this long after its last renewal; it is
    /// renewed every third of it.
    pub lease_ttl: Duration,
    /// How often the active replica publishes the roster's count and
    /// digest ([`Broadcast::Digest`]), so that gateways whose copy missed a
    /// broadcast fetch the roster and heal.
    pub snapshot_interval: Duration,
    /// The most public clients one gateway may hold in the roster.
    pub max_clients_per_gateway: usize,
    /// The most clients in one roster reply page.
    pub max_roster_page: usize,
}

impl PresenceConfig {
    /// The defaults: 500 ms roster tick, 2.5 s warm-up, 6 s lease, 30 s
    /// digests, 50,000 clients per gateway, 1,000 clients per roster page,
    /// and a random replica id.
    pub fn new(subjects: Subjects) -> Self {
        Self {
            subjects,
            replica_id: format!("presence-{}", services::ids::new_client_id()),
            roster_tick: Duration::from_millis(500),
            warmup: Duration::from_millis(2500),
            lease_ttl: Duration::from_secs(6),
            snapshot_interval: Duration::from_secs(30),
            max_clients_per_gateway: crate::roster::DEFAULT_MAX_CLIENTS_PER_GATEWAY,
            max_roster_page: DEFAULT_MAX_ROSTER_PAGE,
        }
    }
}

/// A replica id that is unique per process: the host name and the pid.
pub fn default_replica_id() -> String {
    format!("{}-{}", services::config::host_name(), std::process::id())
}

/// A built presence service, subscribed and ready to [`Presence::run`].
pub struct Presence {
    cfg: PresenceConfig,
    bus: SharedBus,
    metrics: Metrics,
    reports: Inbox<GatewayReport>,
    requests: Inbox<RosterRequest, RosterReply>,
}

impl Presence {
    /// Subscribes to every gateway's reports and (in the queue group
    /// `presence`) to roster requests, registers the metrics in `registry`
    /// and adds the readiness check `nats`. Registers the readiness latch
    /// `presence` and sets it once built.
    ///
    /// # Errors
    /// A duration in `cfg` is zero, or subscribing failed.
    ///
    /// # Panics
    /// The presence metrics are already registered in `registry`.
    pub async fn build(
        cfg: PresenceConfig,
        bus: SharedBus,
        registry: &prometheus::Registry,
        readiness: Readiness,
    ) -> anyhow::Result<Presence> {
        if cfg.roster_tick.is_zero() || cfg.lease_ttl.is_zero() || cfg.snapshot_interval.is_zero() {
            bail!("presence: roster tick, lease ttl and snapshot interval must be positive");
        }
        if cfg.max_roster_page == 0 {
            bail!("presence: --max-roster-page must be positive");
        }
        let latch = readiness.latch("presence");
        let reports = cfg
            .subjects
            .all_gateway_reports()
            .subscribe(&*bus)
            .await
            .context("subscribing to gateway reports")?;
        let requests = cfg
            .subjects
            .roster_request()
            .serve(&*bus, QUEUE)
            .await
            .context("subscribing to roster requests")?;
        let metrics = Metrics::register(registry);
        let b = bus.clone();
        readiness.add_check("nats", move || b.is_connected());
        latch.set();
        Ok(Presence {
            cfg,
            bus,
            metrics,
            reports,
            requests,
        })
    }

    /// Runs until `shutdown` is cancelled: asks every gateway for a
    /// heartbeat, warms up, then keeps the roster and (while holding the
    /// lease) publishes broadcasts. On shutdown an active replica releases
    /// the lease, so a standby takes over within a renewal period instead of
    /// a whole ttl (after a crash the lease lapses after its ttl).
    ///
    /// # Errors
    /// A subscription ended: the bus is gone for good.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Presence {
            cfg,
            bus,
            metrics,
            mut reports,
            mut requests,
        } = self;
        let start = Instant::now();
        let warm_until = start + cfg.warmup;

        // Stops the lease task however this function returns.
        let stop = shutdown.child_token();
        let _stop_guard = stop.clone().drop_guard();
        let (lease_tx, lease_rx) = watch::channel(None);
        let lease_key = cfg.subjects.presence_lease();
        let renewals = tokio::spawn(lease::renew(
            bus.clone(),
            lease_key.clone(),
            cfg.replica_id.clone(),
            cfg.lease_ttl,
            lease_tx,
            stop.clone(),
        ));

        let mut state = State {
            bus,
            subjects: cfg.subjects.clone(),
            metrics,
            roster: Roster::new(warm_until)
                .with_max_clients_per_gateway(cfg.max_clients_per_gateway),
            max_roster_page: cfg.max_roster_page,
            lease: lease_rx,
            active: false,
            warmed: false,
            bus_down: false,
        };
        state.metrics.active.set(0);
        state.publish_sync().await;
        tracing::info!(
            replica = %cfg.replica_id,
            warmup_ms = cfg.warmup.as_millis() as u64,
            "presence started; asked gateways for their client lists"
        );

        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        expiry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Gateways close each wall-clock roster tick with a report; a tick's
        // updates leave as soon as every gateway closed it, or at this
        // deadline a little after the tick if one is late.
        let grace = deadline_grace(cfg.roster_tick);
        let mut deadlines = services::WallClockTicks::new(cfg.roster_tick, grace);
        let mut snapshots =
            tokio::time::interval_at(start + cfg.snapshot_interval, cfg.snapshot_interval);
        snapshots.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let warmup = tokio::time::sleep_until(warm_until);
        tokio::pin!(warmup);

        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = reports.next() => Event::Report(m.context("gateway report subscription ended")?),
                m = requests.next() => Event::Request(m.context("roster request subscription ended")?),
                _ = expiry.tick() => Event::Expiry,
                at = deadlines.tick() => Event::Deadline(at - grace.as_millis() as i64),
                _ = snapshots.tick() => Event::Snapshot,
                () = &mut warmup, if !state.warmed => Event::Warm,
                Ok(()) = state.lease.changed() => Event::Lease,
            };
            let now = Instant::now();
            state.refresh_active(now).await;
            match event {
                Event::Report(m) => state.on_report(m, now).await,
                Event::Request(m) => state.on_request(m).await,
                Event::Expiry => state.on_expiry(now).await,
                Event::Deadline(tick) => {
                    if let Some(delays) = state.roster.take_due_delays(tick) {
                        state
                            .metrics
                            .delay_flushes
                            .with_label_values(&["deadline"])
                            .inc();
                        state.publish(&delays).await;
                    }
                }
                Event::Snapshot => {
                    if state.warmed {
                        state.publish_snapshot().await;
                    }
                }
                Event::Warm => {
                    state.warmed = true;
                    tracing::info!(
                        clients = state.roster.len(),
                        gateways = state.roster.gateway_count(),
                        active = state.active,
                        "presence warmed up"
                    );
                    state.publish_snapshot().await;
                }
                Event::Lease => {}
            }
        }
        state.metrics.active.set(0);
        // Hand the lease over at once rather than after its ttl: stop
        // renewing first, so that no renewal lands after the release.
        stop.cancel();
        let _ = renewals.await;
        if state.active {
            let release = state.bus.release_lease(&lease_key, &cfg.replica_id);
            match tokio::time::timeout(Duration::from_secs(2), release).await {
                Ok(Ok(())) => tracing::info!("released the presence lease"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not release the lease; it lapses"),
                Err(_) => tracing::warn!("releasing the lease timed out; it lapses"),
            }
        }
        tracing::info!(replica = %cfg.replica_id, "presence stopped");
        if let Err(e) = state.bus.flush().await {
            tracing::debug!(error = %e, "flush on shutdown failed");
        }
        Ok(())
    }
}

/// How long after a roster tick presence waits for late gateway reports:
/// a fifth of the tick, at most 50 ms.
fn deadline_grace(tick: Duration) -> Duration {
    (tick / 5).min(Duration::from_millis(50))
}

/// What woke the loop.
enum Event {
    Report(Incoming<GatewayReport>),
    Request(Incoming<RosterRequest, RosterReply>),
    Expiry,
    /// The deadline of the roster tick at this Unix ms.
    Deadline(i64),
    Snapshot,
    Warm,
    Lease,
}

/// The running service's state, owned by its one task.
struct State {
    bus: SharedBus,
    subjects: Subjects,
    metrics: Metrics,
    roster: Roster,
    /// The most clients in one roster reply page.
    max_roster_page: usize,
    /// Until when this replica holds the lease.
    lease: watch::Receiver<Option<Instant>>,
    /// Whether this replica publishes broadcasts (as of the last refresh).
    active: bool,
    /// Whether the warm-up is over.
    warmed: bool,
    /// Whether the bus was found disconnected at the last expiry check.
    bus_down: bool,
}

impl State {
    /// Re-evaluates leadership; a replica that becomes active after its
    /// warm-up publishes the roster's digest at once (during warm-up, the
    /// end of the warm-up does): gateways whose copy differs fetch it.
    async fn refresh_active(&mut self, now: Instant) {
        let active = lease::holds(*self.lease.borrow_and_update(), now);
        if active == self.active {
            return;
        }
        self.active = active;
        self.metrics.active.set(i64::from(active));
        if active {
            tracing::info!("presence replica is now active");
            if self.warmed {
                self.publish_snapshot().await;
            }
        } else {
            tracing::info!("presence replica is no longer active");
        }
    }

    async fn on_report(&mut self, m: Incoming<GatewayReport>, now: Instant) {
        let report = match m.message {
            Ok(r) => r,
            Err(e) => {
                self.metrics.bad_reports.inc();
                tracing::warn!(subject = %m.subject, error = %e, "bad gateway report");
                return;
            }
        };
        let kind = update_kind(&report.update);
        self.metrics.events.with_label_values(&[kind]).inc();
        // A report speaks for the gateway whose subject it came on (NATS
        // permissions let only that gateway publish there): another
        // gateway's id in it is a forgery.
        let own = self.subjects.gateway_reports(&report.gateway);
        if m.subject != own.subject() {
            self.refuse("subject");
            tracing::warn!(
                subject = %m.subject,
                gateway = %report.gateway,
                kind,
                "a gateway report names another gateway than its subject; refused"
            );
            return;
        }
        let gateway = report.gateway.clone();
        let seq = report.seq;
        let outcome = self.roster.apply(report, now);
        let skipped = self.roster.take_refused_entries();
        if skipped > 0 {
            self.metrics
                .refused
                .with_label_values(&[Refusal::ForeignClient.label()])
                .inc_by(skipped);
            tracing::warn!(%gateway, kind, skipped, "report entries naming another gateway's clients skipped");
        }
        match outcome {
            Outcome::Applied(broadcasts) => {
                if kind == "heartbeat" {
                    self.metrics.heartbeats.inc();
                }
                self.metrics
                    .broken_pieces
                    .inc_by(self.roster.take_broken_pieces());
                for wanted in self.roster.take_sync_requests() {
                    self.metrics.sync_requests.inc();
                    tracing::debug!(gateway = %wanted, "heartbeat disagrees with the roster; asking for the full list");
                    self.publish_sync_of(Some(wanted)).await;
                }
                for b in &broadcasts {
                    self.publish(b).await;
                }
                if kind == "delays"
                    && let Some(delays) = self.roster.take_closed_delays()
                {
                    self.metrics
                        .delay_flushes
                        .with_label_values(&["all_reported"])
                        .inc();
                    self.publish(&delays).await;
                }
            }
            Outcome::Stale => {
                self.metrics.stale_heartbeats.inc();
                tracing::debug!(%gateway, seq, "stale heartbeat ignored");
            }
            Outcome::Refused(refusal) => {
                self.refuse(refusal.label());
                tracing::warn!(%gateway, kind, reason = refusal.label(), "gateway report refused");
            }
        }
        self.update_gauges();
    }

    fn refuse(&self, reason: &str) {
        self.metrics.refused.with_label_values(&[reason]).inc();
    }

    async fn on_request(&mut self, m: Incoming<RosterRequest, RosterReply>) {
        if !m.wants_reply() {
            tracing::debug!(subject = %m.subject, "roster request without a reply subject");
            return;
        }
        let answer = match &m.message {
            Ok(RosterRequest {
                after,
                limit: Some(limit),
            }) => {
                self.metrics.roster_pages.with_label_values(&["page"]).inc();
                let limit = (*limit as usize).clamp(1, self.max_roster_page);
                let (clients, next) = self.roster.page(after.as_deref(), limit);
                RosterReply { clients, next }
            }
            Ok(RosterRequest { limit: None, .. }) => {
                // An older gateway: the whole roster, O(room).
                self.metrics
                    .roster_pages
                    .with_label_values(&["whole"])
                    .inc();
                RosterReply {
                    clients: self.roster.clients(),
                    next: None,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable roster request");
                return;
            }
        };
        if let Err(e) = m.reply(&*self.bus, &answer).await {
            tracing::warn!(error = %e, "could not answer a roster request");
        }
    }

    async fn on_expiry(&mut self, now: Instant) {
        // Cut off from the bus, presence hears no heartbeat; that says
        // nothing about the gateways. Give them a fresh grace afterwards and
        // ask for heartbeats at once.
        if !self.bus.is_connected() {
            self.bus_down = true;
            return;
        }
        if self.bus_down {
            self.bus_down = false;
            self.roster.touch_all(now);
            tracing::info!("bus connection is back; asking gateways for heartbeats");
            self.publish_sync().await;
            return;
        }
        let expiry = self.roster.expire(now);
        self.metrics
            .heartbeats_missed
            .inc_by(expiry.missed_heartbeats);
        if !expiry.gateways.is_empty() {
            tracing::warn!(
                gateways = ?expiry.gateways,
                clients = expiry.clients,
                "gateways stopped heartbeating; their clients are gone"
            );
            self.metrics
                .expirations
                .inc_by(expiry.gateways.len() as u64);
            self.metrics.expired_clients.inc_by(expiry.clients as u64);
        }
        for b in &expiry.broadcasts {
            self.publish(b).await;
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.metrics.roster_size.set(self.roster.len() as i64);
        self.metrics
            .gateways
            .set(self.roster.gateway_count() as i64);
    }

    /// Asks every gateway for its full client list.
    async fn publish_sync(&self) {
        self.publish_sync_of(None).await;
    }

    /// Asks `gateway` (every gateway: `None`) for its full client list.
    async fn publish_sync_of(&self, gateway: Option<String>) {
        if let Err(e) = self
            .subjects
            .presence_sync()
            .publish(&*self.bus, &HeartbeatRequest { gateway })
            .await
        {
            tracing::warn!(error = %e, "could not ask gateways for their client lists");
        }
    }

    /// Publishes the roster's count and digest (O(1) bytes): gateways whose
    /// copy differs fetch the roster in pages.
    async fn publish_snapshot(&self) {
        let digest = self.roster.digest();
        self.publish(&digest).await;
    }

    /// Publishes `b` if this replica is active.
    async fn publish(&self, b: &Broadcast) {
        if !self.active {
            return;
        }
        let kind = broadcast_kind(b);
        match self.subjects.broadcast().publish(&*self.bus, b).await {
            Ok(()) => self.metrics.broadcasts.with_label_values(&[kind]).inc(),
            Err(e) => tracing::warn!(kind, error = %e, "could not publish a broadcast"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::deadline_grace;

    #[test]
    fn the_grace_is_a_fifth_of_the_tick_at_most_50_ms() {
        assert_eq!(
            deadline_grace(Duration::from_millis(500)),
            Duration::from_millis(50)
        );
        assert_eq!(
            deadline_grace(Duration::from_millis(100)),
            Duration::from_millis(20)
        );
    }
}
