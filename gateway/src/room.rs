//! The public room as one gateway sees it: the roster copy ([`Mirror`]),
//! the local public connections ([`Hub`]) and the way to presence
//! ([`ReporterHandle`]), behind one narrow interface.
//!
//! Connections join, rename, note delays and leave through it; the roster
//! feed hands it presence's broadcasts. Its one lock (the mirror's) is
//! never held across an await or while another lock is taken.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use services::messages::{Broadcast, RosterClient};
use services::stats::DelayStats;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::{Audience, Hub};
use crate::metrics::GatewayMetrics;
use crate::mirror::Mirror;
use crate::reporter::{Membership, ReporterHandle};

/// A public connection's place in the room, from [`Room::join`].
#[derive(Debug)]
pub struct Seat {
    key: u64,
    channel_name: String,
}

/// The public room of this gateway.
pub struct Room {
    mirror: Mutex<Mirror>,
    hub: Hub,
    reporter: ReporterHandle,
    metrics: GatewayMetrics,
}

impl Room {
    /// A room reporting to presence through `reporter`.
    pub fn new(reporter: ReporterHandle, metrics: GatewayMetrics) -> Self {
        Self {
            mirror: Mutex::new(Mirror::default()),
            hub: Hub::default(),
            reporter,
            metrics,
        }
    }

    /// Seats a public connection: its queue gets every broadcast from now
    /// on (`kick` is cancelled if the queue overflows), the local roster
    /// copy lists it at once, and presence is told.
    pub async fn join(
        &self,
        client: RosterClient,
        v2: bool,
        queue: mpsc::Sender<Utf8Bytes>,
        kick: CancellationToken,
    ) -> Seat {
        let key = self.hub.register(v2, queue, kick);
        let channel_name = client.channel_name.clone();
        self.mirror().add_local(client.clone());
        self.reporter.send(Membership::Join(client)).await;
        Seat { key, channel_name }
    }

    /// Renames a seated client (pages learn it from presence's broadcast).
    pub async fn rename(&self, seat: &Seat, name: String) {
        self.reporter
            .send(Membership::Rename {
                channel_name: seat.channel_name.clone(),
                name,
            })
            .await;
    }

    /// Notes a seated client's new delay: in the roster copy at once (v1
    /// replies show the own delay immediately), to presence at the next
    /// roster tick.
    pub fn note_delay(&self, seat: &Seat, stats: DelayStats) {
        self.mirror().set_stats(&seat.channel_name, stats);
        self.reporter.note_delay(&seat.channel_name, stats);
    }

    /// Sets which clients' delays the seat gets (`None`: everyone).
    pub fn watch(&self, seat: &Seat, ids: Option<HashSet<String>>) {
        self.hub.set_watch(seat.key, ids);
    }

    /// Unseats a connection and tells presence it left.
    pub async fn leave(&self, seat: Seat) {
        self.hub.unregister(seat.key);
        self.mirror().remove_local(&seat.channel_name);
        self.reporter
            .send(Membership::Leave {
                channel_name: seat.channel_name,
            })
            .await;
    }

    /// The v1 `delay_times` frame (the whole roster).
    pub fn v1_frame(&self) -> Utf8Bytes {
        self.mirror().v1_frame()
    }

    /// The v2 `roster` frame (the whole roster).
    pub fn v2_frame(&self) -> Utf8Bytes {
        self.mirror().v2_frame()
    }

    /// Every public client, oldest connection first.
    pub fn list(&self) -> Vec<RosterClient> {
        self.mirror().list()
    }

    /// Applies one of presence's broadcasts to the roster copy and queues
    /// the resulting frames, each serialized once, for every local page.
    pub fn apply(&self, broadcast: Broadcast) {
        let started = Instant::now();
        let fanout = {
            let mut mirror = self.mirror();
            let fanout = mirror.apply(broadcast);
            self.metrics
                .roster_size
                .with_label_values(&[] as &[&str])
                .set(mirror.len() as i64);
            fanout
        };
        let mut dropped = 0;
        for msg in fanout.events {
            dropped += self
                .hub
                .fanout(&Utf8Bytes::from(msg.to_json()), Audience::All);
        }
        if let Some(delays) = fanout.delays {
            dropped += self.hub.fanout_delays(&delays);
        }
        if dropped > 0 {
            self.metrics
                .outbound_drops
                .with_label_values(&[] as &[&str])
                .inc_by(dropped as u64);
        }
        self.metrics
            .broadcast_fanout
            .with_label_values(&[] as &[&str])
            .observe(started.elapsed().as_secs_f64());
    }

    fn mirror(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.mirror.lock().expect("mirror lock")
    }
}
