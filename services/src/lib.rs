//! The shared kit every PingApp service is built from.
//!
//! A reader should find any message type in one place: the browser protocol
//! lives in [`protocol`], the messages the services exchange over the bus in
//! [`messages`], and the subjects they travel on in [`subjects`]. The [`bus`]
//! is the one seam between the services: the standalone binary injects the
//! in-memory implementation, the distributed services inject NATS.

pub mod admin;
pub mod bus;
pub mod config;
pub mod ids;
pub mod messages;
pub mod metrics;
pub mod protocol;
pub mod shutdown;
pub mod stats;
pub mod subjects;
pub mod telemetry;

/// Milliseconds since the Unix epoch, as the wire protocol carries time.
pub fn unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Microseconds since the Unix epoch, as samples are stored.
pub fn unix_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// An interval whose ticks fall on wall-clock multiples of `period`, shifted
/// by `offset` (`offset < period`). Processes that tick with the same period
/// tick in step: each gateway sends its roster-tick report `lead` before
/// presence's tick (offset `period - lead`), so a delay update waits for one
/// tick, not for two unaligned ones.
pub fn aligned_interval(
    period: std::time::Duration,
    offset: std::time::Duration,
) -> tokio::time::Interval {
    let period_us = period.as_micros().max(1) as i64;
    let offset_us = (offset.as_micros() as i64).rem_euclid(period_us);
    let now_us = unix_us();
    let next = ((now_us - offset_us).div_euclid(period_us) + 1) * period_us + offset_us;
    let wait = std::time::Duration::from_micros((next - now_us).max(0) as u64);
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + wait, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn aligned_ticks_fall_on_wall_clock_boundaries() {
        let period = Duration::from_millis(100);
        let mut a = super::aligned_interval(period, Duration::ZERO);
        a.tick().await;
        let phase = super::unix_us().rem_euclid(100_000);
        // Within a few ms after the boundary (scheduling delay).
        assert!(phase < 20_000, "tick at phase {phase} µs");
        let mut b = super::aligned_interval(period, Duration::from_millis(60));
        b.tick().await;
        let phase = super::unix_us().rem_euclid(100_000);
        assert!(
            (60_000..80_000).contains(&phase),
            "tick at phase {phase} µs"
        );
    }
}
