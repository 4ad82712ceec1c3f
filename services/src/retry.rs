//! The one retry schedule of every reconnect and retry loop: exponential
//! backoff with full jitter, so that the replicas of a service that all
//! lost the same dependency do not retry in lockstep once it returns.
//!
//! The exponential schedule comes from [`backon`]; each delay is then drawn
//! uniformly between the first delay and the current cap, the same shape
//! as the pages' reconnect delay (`docs/protocol.md`, "Reconnecting"):
//!
//! ```text
//! cap   = min(max, initial * 2^attempt)
//! delay = initial + random() * (cap - initial)
//! ```
//!
//! ```
//! # use std::time::Duration;
//! let mut backoff = services::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
//! let first = backoff.next_delay();
//! assert!(first == Duration::from_millis(50));
//! assert!(backoff.next_delay() <= Duration::from_millis(100));
//! backoff.reset(); // after a success
//! ```

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;
use tokio_util::sync::CancellationToken;

/// A retry schedule: call [`Backoff::next_delay`] after each failure,
/// [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    caps: <ExponentialBuilder as BackoffBuilder>::Backoff,
}

impl Backoff {
    /// Delays from `initial`, doubling their cap up to `max` (a `max` below
    /// `initial` is raised to it).
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Self {
            initial,
            max,
            caps: caps(initial, max),
        }
    }

    /// How long to wait before the next attempt: uniform between the
    /// initial delay and the current cap, which doubles with every call.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.caps.next().unwrap_or(self.max).min(self.max);
        let spread = cap.saturating_sub(self.initial);
        self.initial + spread.mul_f64(rand::rng().random::<f64>())
    }

    /// Waits [`Backoff::next_delay`], or until `stop` is cancelled.
    /// Returns `false` when stopped.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Starts over from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.caps = caps(self.initial, self.max);
    }
}

fn caps(initial: Duration, max: Duration) -> <ExponentialBuilder as BackoffBuilder>::Backoff {
    ExponentialBuilder::default()
        .with_min_delay(initial)
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn delays_stay_under_a_doubling_cap() {
        let mut b = Backoff::new(MS(50), MS(2000));
        assert_eq!(b.next_delay(), MS(50), "the first cap is the initial delay");
        for cap in [100, 200, 400, 800, 1600, 2000, 2000, 2000] {
            let d = b.next_delay();
            assert!(d >= MS(50) && d <= MS(cap), "{d:?} outside 50..={cap} ms");
        }
        b.reset();
        assert_eq!(b.next_delay(), MS(50));
    }

    #[test]
    fn delays_are_jittered() {
        // 200 draws at the 2 s cap: all equal only if there is no jitter.
        let mut b = Backoff::new(MS(50), MS(2000));
        for _ in 0..10 {
            b.next_delay();
        }
        let draws: std::collections::BTreeSet<Duration> =
            (0..200).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 100, "only {} distinct delays", draws.len());
        let low = draws.iter().filter(|d| **d < MS(1000)).count();
        assert!((20..=180).contains(&low), "{low} of 200 below the middle");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_stops_on_cancel() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!b.wait(&stop).await);
        assert!(
            b.wait(&CancellationToken::new()).await,
            "slept in paused time"
        );
    }
}
