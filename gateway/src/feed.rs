//! The roster feed, presence to gateway: the whole roster fetched in pages
//! at start, then every broadcast, each applied to the [`Room`]. When
//! presence's periodic roster digest ([`Broadcast::Digest`]) differs from
//! the copy (a broadcast was lost, or presence restarted or failed over),
//! the roster is fetched again in pages and reconciled: O(room) only then
//! (docs/architecture.md, "How the roster converges").

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use services::bus::SharedBus;
use services::bus::topic::{Inbox, Service};
use services::messages::{Broadcast, RosterClient, RosterReply, RosterRequest};
use services::retry::Backoff;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::room::Room;

/// How long one roster page request waits for presence.
const ROSTER_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the feed fetches the roster from.
#[derive(Clone)]
pub struct RosterSource {
    /// The bus.
    pub bus: SharedBus,
    /// Presence's roster service.
    pub service: Service<RosterRequest, RosterReply>,
    /// Clients per page (`--presence-piece-clients`).
    pub page: u32,
    /// Counts the fetches.
    pub metrics: GatewayMetrics,
}

impl RosterSource {
    /// The whole roster, page after page.
    ///
    /// # Errors
    /// A page request failed or timed out.
    async fn fetch(&self) -> Result<Vec<RosterClient>, services::bus::BusError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let request = RosterRequest {
                after,
                limit: Some(self.page.max(1)),
            };
            let reply = self
                .service
                .request(&*self.bus, &request, ROSTER_REQUEST_TIMEOUT)
                .await?;
            all.extend(reply.clients);
            match reply.next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
    }
}

/// Applies presence's broadcasts until `stop` is cancelled or the
/// subscription ends. A digest that differs from the copy makes it fetch
/// the roster before it applies the broadcasts that came meanwhile (they
/// are newer than or included in the fetched roster, and applying an event
/// again changes nothing).
pub async fn broadcasts(
    room: Arc<Room>,
    mut inbox: Inbox<Broadcast>,
    source: RosterSource,
    stop: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            m = inbox.next() => match m {
                Some(m) => m,
                None => return,
            }
        };
        match incoming.message {
            Ok(Broadcast::Digest { count, digest }) => {
                if room.roster_agrees(count, digest) {
                    continue;
                }
                tracing::debug!(
                    count,
                    "roster copy differs from presence's digest; fetching it"
                );
                source
                    .metrics
                    .roster_fetches
                    .with_label_values(&["digest"])
                    .inc();
                let fetched = tokio::select! {
                    _ = stop.cancelled() => return,
                    f = source.fetch() => f,
                };
                match fetched {
                    Ok(clients) => room.apply(Broadcast::Snapshot { clients }),
                    // The next digest tries again.
                    Err(e) => tracing::warn!(error = %e, "could not fetch the roster"),
                }
            }
            Ok(b) => room.apply(b),
            Err(e) => tracing::warn!(error = %e, "undecodable broadcast"),
        }
    }
}

/// Fetches the whole roster from presence in pages, retrying until it
/// answers (or `stop` is cancelled), and applies it as a snapshot.
pub async fn fetch_roster(room: Arc<Room>, source: RosterSource, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match source.fetch().await {
            Ok(clients) => {
                source
                    .metrics
                    .roster_fetches
                    .with_label_values(&["start"])
                    .inc();
                room.apply(Broadcast::Snapshot { clients });
                return;
            }
            Err(e) => tracing::debug!(error = %e, "roster not available yet"),
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}
