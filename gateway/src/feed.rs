//! The roster feed, presence to gateway: the whole roster fetched once at
//! start, then every broadcast, each applied to the [`Room`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use services::bus::SharedBus;
use services::bus::topic::{Inbox, Service};
use services::messages::{Broadcast, RosterReply, RosterRequest};
use services::retry::Backoff;
use tokio_util::sync::CancellationToken;

use crate::room::Room;

/// How long one roster request waits for presence.
const ROSTER_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Applies presence's broadcasts until `stop` is cancelled or the
/// subscription ends.
pub async fn broadcasts(room: Arc<Room>, mut inbox: Inbox<Broadcast>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            m = inbox.next() => match m {
                Some(m) => m,
                None => return,
            }
        };
        match incoming.message {
            Ok(b) => room.apply(b),
            Err(e) => tracing::warn!(error = %e, "undecodable broadcast"),
        }
    }
}

/// Fetches the whole roster from presence, retrying until it answers (or
/// `stop` is cancelled), and applies it as a snapshot.
pub async fn fetch_roster(
    room: Arc<Room>,
    bus: SharedBus,
    roster: Service<RosterRequest, RosterReply>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let reply = roster
            .request(&*bus, &RosterRequest, ROSTER_REQUEST_TIMEOUT)
            .await;
        match reply {
            Ok(reply) => {
                room.apply(Broadcast::Snapshot {
                    clients: reply.clients,
                });
                return;
            }
            Err(e) => tracing::debug!(error = %e, "roster not available yet"),
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}
