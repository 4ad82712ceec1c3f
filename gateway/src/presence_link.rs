//! The gateway's side of presence: roster ticks with coalesced delays,
//! heartbeats, the start-up roster fetch, and the broadcast subscription
//! that keeps the roster copy and fans every event out to local pages.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use services::bus::Subscription;
use services::messages::{Broadcast, GatewayUpdate, RosterRequest, decode};
use services::protocol::ServerMessage;

use crate::hub::Audience;
use crate::state::Shared;

/// Closes every wall-clock roster tick with a `Delays` report of the
/// clients whose delay changed, empty when none did: presence broadcasts a
/// tick's updates as soon as every gateway closed it, so a delay reaches
/// pages within one tick plus delivery.
pub async fn roster_ticks(shared: Arc<Shared>) {
    let period = shared.args.roster_tick();
    let mut ticks = services::WallClockTicks::new(period, Duration::ZERO);
    loop {
        let tick_ms = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            t = ticks.tick() => t,
        };
        shared
            .report(|local| {
                let delays = local
                    .dirty
                    .drain()
                    .filter_map(|id| {
                        let stats = local.clients.get(&id)?.stats?;
                        Some((id, stats))
                    })
                    .collect();
                Some(GatewayUpdate::Delays {
                    delays,
                    tick_ms: Some(tick_ms),
                })
            })
            .await;
    }
}

/// Sends a heartbeat with every local public client each interval, and at
/// once when presence asks (after presence restarts).
pub async fn heartbeats(shared: Arc<Shared>) {
    let interval = shared.args.heartbeat_interval();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = shared.heartbeat_now.notified() => {}
        }
        let interval_ms = interval.as_millis() as u64;
        shared
            .report(|local| {
                Some(GatewayUpdate::Heartbeat {
                    clients: local.clients.values().cloned().collect(),
                    interval_ms,
                })
            })
            .await;
    }
}

/// Answers presence's request for heartbeats.
pub async fn sync_requests(shared: Arc<Shared>, mut sub: Subscription) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            m = sub.next() => match m {
                Some(_) => shared.heartbeat_now.notify_one(),
                None => return,
            }
        }
    }
}

/// Fetches the whole roster from presence, retrying until it answers.
pub async fn fetch_roster(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let req = shared
            .subjects
            .roster_request()
            .request(&*shared.bus, &RosterRequest, Duration::from_secs(2))
            .await;
        match req {
            Ok(reply) => {
                apply(
                    &shared,
                    Broadcast::Snapshot {
                        clients: reply.clients,
                    },
                );
                return;
            }
            Err(e) => tracing::debug!(error = %e, "roster not available yet"),
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Applies presence's broadcasts until the gateway drains.
pub async fn broadcasts(shared: Arc<Shared>, mut sub: Subscription) {
    loop {
        let msg = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => m,
                None => return,
            }
        };
        match decode::<Broadcast>(&msg.payload) {
            Ok(b) => apply(&shared, b),
            Err(e) => tracing::warn!(error = %e, "undecodable broadcast"),
        }
    }
}

/// Updates the roster copy with one broadcast and hands the resulting
/// frames, each serialized once, to every local public connection.
pub fn apply(shared: &Shared, b: Broadcast) {
    let started = std::time::Instant::now();
    let mut tick_delays = None;
    let frames: Vec<(ServerMessage, Audience)> = {
        let mut mirror = shared.mirror.lock().expect("mirror lock");
        let frames = match b {
            Broadcast::Connect { client } => {
                let frame = ServerMessage::Connect {
                    channel_name: client.channel_name.clone(),
                    name: client.name.clone(),
                    gateway: client.gateway.clone(),
                };
                mirror.upsert(client);
                vec![(frame, Audience::All)]
            }
            Broadcast::Rename { channel_name, name } => {
                mirror.rename(&channel_name, &name);
                vec![(
                    ServerMessage::ChangeName { channel_name, name },
                    Audience::All,
                )]
            }
            Broadcast::Disconnect { channel_name } => {
                if shared.is_local(&channel_name) {
                    // Presence lost track of a live local client (e.g. our
                    // heartbeats were cut off); the next heartbeat restores it.
                    tracing::debug!(%channel_name, "presence dropped a live local client");
                }
                mirror.remove(&channel_name);
                vec![(ServerMessage::Disconnect { channel_name }, Audience::All)]
            }
            Broadcast::Delays { delays } => {
                for (id, stats) in &delays {
                    mirror.set_stats(id, *stats);
                }
                tick_delays = Some(delays);
                Vec::new()
            }
            Broadcast::Snapshot { clients } => mirror
                .reconcile(clients, |id| shared.is_local(id))
                .into_iter()
                .map(|f| (f, Audience::All))
                .collect(),
        };
        shared
            .metrics
            .roster_size
            .with_label_values(&[] as &[&str])
            .set(mirror.len() as i64);
        frames
    };
    let mut dropped = 0;
    for (msg, audience) in frames {
        dropped += shared.hub.fanout(&Utf8Bytes::from(msg.to_json()), audience);
    }
    if let Some(delays) = tick_delays {
        dropped += shared.hub.fanout_delays(&delays);
    }
    if dropped > 0 {
        shared
            .metrics
            .outbound_drops
            .with_label_values(&[] as &[&str])
            .inc_by(dropped as u64);
    }
    shared
        .metrics
        .broadcast_fanout
        .with_label_values(&[] as &[&str])
        .observe(started.elapsed().as_secs_f64());
}
