//! The per-connection message rate limit.

use std::time::{Duration, Instant};

/// Counts data frames in one-second windows; more than the limit in one
/// window ends the connection (close 1008).
#[derive(Debug)]
pub struct RateWindow {
    limit: u32,
    start: Option<Instant>,
    count: u32,
}

impl RateWindow {
    /// At most `limit` frames per window.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            start: None,
            count: 0,
        }
    }

    /// Counts a frame received at `at`; false when it is over the limit.
    pub fn admit(&mut self, at: Instant) -> bool {
        match self.start {
            Some(start) if at.duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.start = Some(at);
                self.count = 0;
            }
        }
        self.count += 1;
        self.count <= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_holds_within_a_window_and_resets_after_it() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(3);
        for i in 0..3 {
            assert!(w.admit(t0 + Duration::from_millis(i * 100)), "frame {i}");
        }
        assert!(!w.admit(t0 + Duration::from_millis(999)), "fourth in 1 s");
        assert!(w.admit(t0 + Duration::from_millis(1000)), "new window");
        assert!(w.admit(t0 + Duration::from_millis(1500)));
        assert!(w.admit(t0 + Duration::from_millis(1999)));
        assert!(!w.admit(t0 + Duration::from_millis(1999)));
    }
}
