//! Leadership: one presence replica at a time publishes broadcasts. The
//! lease is renewed every third of its time to live (a standby tries to
//! take it every second, or every third of the ttl if that is shorter);
//! the replica counts itself active only until `ttl` after the start of its
//! last successful renewal, so when the bus is unreachable it steps down before another
//! replica can take the lapsed lease (no split brain).

use std::time::Duration;

use services::bus::{LeaseKey, SharedBus};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often at most a replica that does not hold the lease tries to take
/// it.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// Renews `lease` for `holder` until `stop`, publishing on `tx`
/// until when this replica holds it (`None`: another replica holds it).
/// The value only notifies when holding starts or stops; renewals update it
/// silently.
pub(crate) async fn renew(
    bus: SharedBus,
    lease: LeaseKey,
    holder: String,
    ttl: Duration,
    tx: watch::Sender<Option<Instant>>,
    stop: CancellationToken,
) {
    let every = ttl / 3;
    // A standby asks more often, so that it takes a released lease soon.
    let standby_every = every.min(STANDBY_RETRY);
    let mut failing = false;
    let mut holding = false;
    loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(every, bus.try_lease(&lease, &holder, ttl)) => r,
        };
        match attempt {
            Ok(Ok(held)) => {
                if failing {
                    tracing::info!(%lease, "lease renewal works again");
                    failing = false;
                }
                holding = held;
                let until = held.then_some(started + ttl);
                tx.send_if_modified(|v| {
                    let changed = v.is_some() != until.is_some();
                    *v = until;
                    changed
                });
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(%lease, error = %e, "lease renewal failed");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(%lease, "lease renewal timed out");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(started + if holding { every } else { standby_every }) => {}
        }
    }
}

/// Whether a lease held until `until` is held at `now`.
pub(crate) fn holds(until: Option<Instant>, now: Instant) -> bool {
    until.is_some_and(|u| now < u)
}
