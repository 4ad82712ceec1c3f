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
pub mod limits;
pub mod messages;
pub mod metrics;
pub mod protocol;
pub mod retry;
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

/// Ticks on wall-clock multiples of a period, shifted by an offset, so that
/// processes with the same period tick in step: every gateway closes a
/// roster tick at the same moment, and presence's deadline follows a little
/// later.
///
/// Every tick sleeps until the next boundary computed from the wall clock,
/// so the ticks do not drift: a `tokio::time::Interval` runs on the
/// monotonic clock and, once a tick is late, keeps the delay for good.
/// A tick that comes more than a period late skips the boundaries missed.
#[derive(Debug)]
pub struct WallClockTicks {
    period_us: i64,
    offset_us: i64,
    last_us: Option<i64>,
}

impl WallClockTicks {
    /// Ticks at `k * period + offset` (Unix time; `offset` is taken modulo
    /// `period`).
    pub fn new(period: std::time::Duration, offset: std::time::Duration) -> Self {
        let period_us = (period.as_micros() as i64).max(1);
        Self {
            period_us,
            offset_us: (offset.as_micros() as i64).rem_euclid(period_us),
            last_us: None,
        }
    }

    /// The first boundary after `now_us`, and after the last one returned.
    fn next_after(&self, now_us: i64) -> i64 {
        let (p, o) = (self.period_us, self.offset_us);
        let next = ((now_us - o).div_euclid(p) + 1) * p + o;
        match self.last_us {
            Some(last) if next <= last => last + p,
            _ => next,
        }
    }

    /// Waits for the next boundary and returns it, in Unix milliseconds.
    pub async fn tick(&mut self) -> i64 {
        let now = unix_us();
        let next = self.next_after(now);
        tokio::time::sleep(std::time::Duration::from_micros((next - now).max(0) as u64)).await;
        self.last_us = Some(next);
        next.div_euclid(1000)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::WallClockTicks;

    #[test]
    fn boundaries_follow_the_wall_clock_and_never_repeat() {
        let mut t = WallClockTicks::new(Duration::from_millis(500), Duration::from_millis(50));
        assert_eq!(t.next_after(1_000_000), 1_050_000);
        assert_eq!(t.next_after(1_049_999), 1_050_000);
        assert_eq!(t.next_after(1_050_000), 1_550_000);
        // Woken a little early: the same boundary is not returned twice.
        t.last_us = Some(1_050_000);
        assert_eq!(t.next_after(1_049_990), 1_550_000);
        // Woken more than a period late: the missed boundaries are skipped.
        assert_eq!(t.next_after(2_700_000), 3_050_000);
    }

    /// The wall clock cannot be paused (`tokio::time::pause` stops only
    /// tokio's clock), so this checks what holds however loaded the machine
    /// is: a tick never comes before its boundary, is named by it, and no
    /// boundary comes twice. How late a tick may be is not asserted.
    #[tokio::test]
    async fn ticks_fall_on_wall_clock_boundaries() {
        let mut t = WallClockTicks::new(Duration::from_millis(100), Duration::from_millis(60));
        let mut previous = None;
        for _ in 0..3 {
            let boundary = t.tick().await;
            let now_ms = super::unix_us().div_euclid(1000);
            assert_eq!(boundary.rem_euclid(100), 60, "named by its boundary");
            assert!(now_ms >= boundary, "tick at {now_ms}, before {boundary}");
            if let Some(p) = previous {
                assert!(boundary > p, "boundary {boundary} after {p}");
            }
            previous = Some(boundary);
        }
    }
}
